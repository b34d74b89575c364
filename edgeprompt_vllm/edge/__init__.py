"""The edge side: EdgePromptConnector (a vLLM KV connector, kv_consumer) loads cloud-prompt KV."""
