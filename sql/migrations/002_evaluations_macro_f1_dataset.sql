-- User data: classification scores macro F1, and each row names the held-out data it scored.
ALTER TABLE evaluations ADD COLUMN IF NOT EXISTS macro_f1 DOUBLE;
ALTER TABLE evaluations ADD COLUMN IF NOT EXISTS dataset VARCHAR;
