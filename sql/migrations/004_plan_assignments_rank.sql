-- Rank chosen per matrix by the ILP: the rank of each assigned matrix's factors (0: none).
ALTER TABLE plan_assignments ADD COLUMN IF NOT EXISTS rank INTEGER;
