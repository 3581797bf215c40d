"""Real-data recipes: each trains this project's model and a reference model under the same CPU-time budget."""
