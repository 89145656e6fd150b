"""Built-in recipe files (TOML), installed as the package data ``graphc.recipe_files``."""
