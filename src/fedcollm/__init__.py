"""fedcollm: federated co-tuning of a server LLM with client SLMs (FedCoLLM, arXiv 2411.11707)."""

__version__ = "0.1.0"
