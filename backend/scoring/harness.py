"""EleutherAI's lm-evaluation-harness on Fornax: an `lm_eval` model class registered as "fornax" (loglikelihood,
loglikelihood_rolling, generate_until), scoring with any backend of a loaded model.

    python -m backend.scoring.harness run --model fornax --model_args source=default,backend=eager --tasks ...

is lm_eval's own command line with this module imported first (that import is what registers "fornax"; lm-eval
finds models outside its package only through installed entry points). From Python:
`lm_eval.simple_evaluate(model=FornaxLM(handle=h), tasks=[...])`. `lm-eval` is an optional dependency
(requirements-dev.txt); nothing else in Fornax imports it."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from ..errors import ScoringError
from .perplexity import DEFAULT_MAX_LENGTH, handle_logits_fn


@register_model("fornax")
class FornaxLM(TemplateLM):
    """A Fornax model for the harness. `source` is what backend.load takes (or pass a loaded `handle`)."""

    def __init__(self, source: str = "default", backend: str | None = None, dtype: str | None = None,
                 max_length: int | None = None, handle=None, **harness_options):
        super().__init__()
        if handle is None:
            from ..loading import load

            handle = load(source, dtype=dtype)
        self.handle, self.fornax_backend = handle, backend
        self.logits_fn = handle_logits_fn(handle, backend)
        self.max_length = int(max_length or min(DEFAULT_MAX_LENGTH, handle.config.max_seq_len))
        if self.max_length > handle.config.max_seq_len:
            raise ScoringError(f"max_length {self.max_length} exceeds the model's context {handle.config.max_seq_len}")
        eos = handle.tokenizer.eos_token
        eos_id = handle.tokenizer.token_to_id(eos) if eos else None
        self._eot = eos_id if eos_id is not None else min(handle.eos_ids)

    @property
    def eot_token_id(self) -> int:
        return self._eot

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.handle.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Each request ((context, continuation), context ids, continuation ids): the continuation's total
        log-probability after the context (cut from the left to the window), and whether greedy decoding gives it."""
        out = []
        for _, context_enc, continuation_enc in tqdm(requests, disable=disable_tqdm, desc="fornax loglikelihood"):
            ids = (list(context_enc) + list(continuation_enc))[-(self.max_length + 1):]
            n = len(continuation_enc)
            if n == 0 or n >= len(ids):
                raise ScoringError(f"a continuation of {n} tokens does not fit a window of {self.max_length} tokens "
                                   f"after its context")
            x = torch.tensor([ids[:-1]])                                      # (1, T)
            logits = self.logits_fn(x)[0, -n:].float().cpu()                  # (n, V): the continuation's predictions
            target = torch.tensor(ids[-n:])                                   # (n,)
            logp = -F.cross_entropy(logits, target, reduction="sum").item()
            out.append((logp, bool((logits.argmax(-1) == target).all())))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total log-probability of whole texts, in the harness's own disjoint rolling windows (the first token is
        predicted from the end-of-text token)."""
        out = []
        for (text,) in tqdm([r.args for r in requests], disable=disable_tqdm, desc="fornax rolling"):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1)]
            scores = self._loglikelihood_tokens([(None, ctx, pred) for ctx, pred in windows], disable_tqdm=True)
            out.append(sum(logp for logp, _ in scores))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, gen_kwargs in tqdm([r.args for r in requests], disable=disable_tqdm, desc="fornax generate"):
            kwargs = dict(gen_kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            do_sample = kwargs.pop("do_sample", False)
            temperature = float(kwargs.pop("temperature", 0.0)) if do_sample else 0.0
            max_new = int(kwargs.pop("max_gen_toks", 256))
            room = self.handle.config.max_seq_len - len(self.handle.encode(context)) - 1
            result = self.handle.generate(context, backend=self.fornax_backend, temperature=temperature,
                                          max_new_tokens=max(1, min(max_new, room)), stop=until,
                                          top_p=float(kwargs.pop("top_p", 1.0)), seed=kwargs.pop("seed", None))
            out.append(result.text)
        return out


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
