"""What every command that writes a model shares: its settings (settings.py), its lifecycle
(lifecycle.py) and the model card it leaves in the output directory (card.py)."""
