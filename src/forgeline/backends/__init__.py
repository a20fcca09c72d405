"""Model backends: where generated text comes from."""
