-- Training holds out a validation split: the mean validation loss on the steps that validated.
ALTER TABLE train_steps ADD COLUMN IF NOT EXISTS val_loss DOUBLE;
