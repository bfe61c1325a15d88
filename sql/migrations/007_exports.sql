-- Exports: the evaluations that score an exported file say in which runtime and which export.
-- (The exports and export_tensors tables are new: schema.sql creates them in every home.)
ALTER TABLE evaluations ADD COLUMN IF NOT EXISTS runtime VARCHAR;
ALTER TABLE evaluations ADD COLUMN IF NOT EXISTS export_key VARCHAR;
