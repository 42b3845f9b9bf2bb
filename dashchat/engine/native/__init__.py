"""The native engine: async front, step thread, scheduler, paged KV cache, model runner, sampler."""
