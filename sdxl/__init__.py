"""SDXL generation and training library. Nothing in it imports cog: predict.py and train.py are the Cog edge."""
