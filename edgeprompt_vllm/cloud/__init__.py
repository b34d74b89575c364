"""The cloud side: CloudPromptService (a Ray actor) prefills cloud prompts once and serves their KV."""
