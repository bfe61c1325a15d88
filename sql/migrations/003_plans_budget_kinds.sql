-- Budgets that count the factors or the whole model: what a plan's budget counts, the ranks
-- it chose from, and its size measured each way. Older plans (NULL) are quantized-part budgets.
ALTER TABLE plans ADD COLUMN IF NOT EXISTS budget_kind VARCHAR;
ALTER TABLE plans ADD COLUMN IF NOT EXISTS ranks VARCHAR;
ALTER TABLE plans ADD COLUMN IF NOT EXISTS factor_bits INTEGER;
ALTER TABLE plans ADD COLUMN IF NOT EXISTS bits_with_lowrank DOUBLE;
ALTER TABLE plans ADD COLUMN IF NOT EXISTS total_bytes BIGINT;
