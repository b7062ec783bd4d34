"""Pretraining and fine-tuning GPT-style language models."""
