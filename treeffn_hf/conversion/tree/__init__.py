"""The tree FFN's recovery recipe (`recipe.py`)."""
