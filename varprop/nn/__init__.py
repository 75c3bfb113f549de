"""Building blocks shared by the Monte-Carlo engine, the theory and the
trainer: init schemes (inits.py), activations (activations.py), batch norm
(batchnorm.py) and the typed layer sequence (layers.py)."""
