-- Learning rate chosen per adapter on validation: the peak rate of the adapter an
-- after_finetune row scored.
ALTER TABLE evaluations ADD COLUMN IF NOT EXISTS lr DOUBLE;
