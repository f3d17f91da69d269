"""mistralrs-jax: an LLM inference engine on JAX/XLA with an OpenAI-compatible server."""
from .outputs import CompletionOutput, Logprob, RequestOutput
from .sampling_params import SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "load_tokenizer",
           "default_model_path"]


def __getattr__(name):
    # Lazy: importing the package must not pull in JAX for light users (the CLI's --help).
    if name == "LLM":
        from .llm import LLM

        return LLM
    if name == "load_tokenizer":
        from .loading.tokenizer import load_tokenizer

        return load_tokenizer
    if name == "default_model_path":
        from .loading.hub import default_model_path

        return default_model_path
    raise AttributeError(name)
