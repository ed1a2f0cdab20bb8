"""Framework adapters: `kvblend.integrations.langchain` and `kvblend.integrations.llamaindex`.

Each module needs its framework installed (`pip install 'kvblend[langchain]'` or `'kvblend[llamaindex]'`).
"""
