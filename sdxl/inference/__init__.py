"""One generation: the pipeline calls, prompt encoding, the safety checker, the watermark."""
