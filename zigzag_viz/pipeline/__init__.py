"""The model-facing pipeline, one module per stage: load the model (`models`), attend over ragged and
compressed caches (`attention`), record layer signals during the prefill (`capture`, run by `runtime`),
allocate per-layer budgets (`budgets`, pure), choose tokens within a layer (`selection`) and hold the
compressed cache (`cache`)."""
