"""The runnable YAML recipes and the small datasets they train on.

A package only so that the wheel ships them: `align demo` finds
`smollm2-sft-rm-dpo.yaml` here with `importlib.resources.files("recipes")`, and a recipe's
relative data paths (`data/...`) resolve next to the recipe file, in a checkout and in
site-packages alike. `data/make_tiny_data.py` re-makes the JSONL files.
"""
