"""Generate and compare: prompts with known answers (`prompts`), metrics against full KV (`metrics`), the
comparison records (`compare`) and the runner that every caller uses to produce them (`runner`)."""
