"""The micro-gated MLP's recovery recipe (`recipe.py`)."""
