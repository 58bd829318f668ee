"""Lowering: what a target (portable, ort-cpu, ort-cuda, tensorrt) adds after a recipe, and host facts."""
