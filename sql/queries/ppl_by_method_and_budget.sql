-- Perplexity by method and budget, before and after finetuning, with the storage each
-- method really uses (quantized part, and including the 16-bit low-rank factors).
SELECT
    method,
    budget,
    stage,
    round(perplexity, 3)            AS perplexity,
    round(bits_per_param, 4)        AS bits_per_param,
    round(bits_incl_lowrank, 4)     AS bits_incl_lowrank,
    created_at
FROM evaluations
WHERE model = $model
QUALIFY row_number() OVER (PARTITION BY method, budget, stage ORDER BY created_at DESC) = 1
ORDER BY stage <> 'reference', method, budget, stage DESC;
