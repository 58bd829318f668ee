"""Analysis: eval (perplexity, embedding cosine), bench, report and inspect over artifacts."""
