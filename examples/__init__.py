"""Worked examples, importable by path from the checkout (`examples.digits_gru:make_datasets`)."""
