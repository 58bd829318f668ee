"""Export or import: a source model (Hugging Face folder, GGUF file, alias) becomes an fp32 artifact."""
