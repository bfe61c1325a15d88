-- The held-out metric (perplexity, response perplexity or accuracy) by method and budget,
-- before and after finetuning, with the storage each method really uses (quantized part,
-- and including the 16-bit low-rank factors). method 'reference' after_finetune is the
-- uncompressed model finetuned with the same LoRA recipe.
SELECT
    method,
    budget,
    stage,
    metric,
    round(value, 4)                 AS value,
    dataset,
    round(bits_per_param, 4)        AS bits_per_param,
    round(bits_incl_lowrank, 4)     AS bits_incl_lowrank,
    created_at
FROM evaluations
WHERE model = $model
QUALIFY row_number() OVER (PARTITION BY method, budget, stage ORDER BY created_at DESC) = 1
ORDER BY stage <> 'reference', method, budget, stage DESC;
