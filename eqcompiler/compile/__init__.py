"""Compile: a recipe (data) runs passes over the IR with a typed context; quantization math and IR helpers."""
