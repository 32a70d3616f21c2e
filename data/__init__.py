"""Folder-per-class datasets, prompts, instruction annotations and the toy dataset."""
