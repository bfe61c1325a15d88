-- Where each plan spent its bits: average bits/param per layer and layer type
-- (weighted by matrix size), next to the plan's budget.
SELECT p.method, p.budget, m.layer, m.kind,
       round(sum(a.bits_per_param * m.numel) / sum(m.numel), 4) AS bits_per_param,
       string_agg(DISTINCT a.config, ', ')                      AS configs
FROM plans p
JOIN plan_assignments a ON a.plan_id = p.plan_id
JOIN matrices m ON m.model = p.model AND m.name = a.matrix
WHERE p.model = $model
GROUP BY ALL
ORDER BY p.method, p.budget, m.layer, m.kind;
