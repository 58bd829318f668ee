"""The artifact: the folder a compile writes (model, external data, manifest, tokenizer), written atomically."""
