"""Text: the checkpoint's tokenizer and chat template, and the token classes of structured output. Used by the
engine, the sampler, the Triton adapter and the fronts, without reaching into the network's package."""
