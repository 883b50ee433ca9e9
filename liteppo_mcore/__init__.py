"""liteppo-mcore: a Megatron-core TP/PP/CP/DP trainer for LitePPO on LLM reasoning with verifiable rewards."""

__version__ = "0.1.0"
