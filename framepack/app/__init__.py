"""Front ends (CLI, UI, HTTP API): thin adapters over the engine, no model code."""
