"""Running a model's decoder layers one at a time, each on every calibration batch.

Calibration and the ``alpha="auto"`` search both need every decoder layer's input. ``LayerwiseRun`` gets
them without running the whole model at once:

1. **Record.** One forward per batch with every decoder layer's ``forward`` replaced by a stub that
   records its call (the first layer's input hidden states, and every layer's own keyword arguments:
   attention masks and rotary tables differ between sliding-window and global layers in Gemma 2/3, so one
   layer's arguments are not another's) and passes its input through. The last stub stops the forward,
   so the head never runs. Only the modules outside the decoder layers (embeddings, rotary tables, the
   final norm, the head: "the shell") are needed on the execution device, not the layers' weights.
2. **Walk.** Layer by layer: its weights go to the execution device, it runs on every batch's input
   (the previous layer's output with its own recorded arguments), and its weights go back. Forward hooks
   on the layer's modules (calibration's observers) see exactly what a whole-model forward would show
   them.
3. **Tail** (when asked): one forward per batch with every stub returning the last layer's output, so the
   final norm and the head run on real hidden states (observers on ``lm_head``).

With the model already on the execution device nothing moves and the result is that of a whole-model
forward. With the model in CPU memory and ``device="cuda"``, a model larger than the GPU is calibrated on
the GPU: what the GPU holds at once is the shell, one decoder layer, and the hidden states of every
calibration batch (``num_samples x seq_len x hidden`` in the model's dtype, twice).

Weights are moved by swapping each parameter's ``.data`` and each buffer, and put back as the very same
tensors afterwards: the model is left exactly as it was, also after an error.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


class _StopForward(Exception):
    pass


def hidden_in(args: tuple, kwargs: dict):
    """The hidden states a decoder layer is called with (first positional, or ``hidden_states=``)."""
    return args[0] if args else kwargs.get("hidden_states")


def with_hidden(args: tuple, kwargs: dict, hidden):
    """The call ``(args, kwargs)`` with its hidden states replaced."""
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def hidden_out(out):
    """The hidden states of a decoder layer's output (a tensor, or a tuple whose first item it is)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _like(template, hidden):
    """``hidden`` in the structure of a real layer output ``template``."""
    if isinstance(template, tuple):
        return (hidden,) + tuple(template[1:])
    return hidden


class _Moved:
    """Parameters and buffers of ``modules`` moved to ``device``; ``restore()`` puts the original tensors back."""

    def __init__(self, modules, device: torch.device):
        self.device = device
        self.params: list[tuple[nn.Parameter, torch.Tensor]] = []
        self.buffers: list[tuple[nn.Module, str, torch.Tensor]] = []
        seen = set()
        try:
            for module in modules:
                for param in module._parameters.values():
                    if param is not None and id(param) not in seen and self.needs_move(param):
                        seen.add(id(param))  # a tied weight is moved once
                        self.params.append((param, param.data))
                        param.data = self.move(param.data)
                for name, buf in module._buffers.items():
                    if buf is not None and self.needs_move(buf):
                        self.buffers.append((module, name, buf))
                        module._buffers[name] = self.move(buf)
        except BaseException:
            self.restore()
            raise

    def needs_move(self, t: torch.Tensor) -> bool:
        return t.device != self.device

    def move(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device)

    def restore(self) -> None:
        for param, original in reversed(self.params):
            param.data = original
        for module, name, original in reversed(self.buffers):
            module._buffers[name] = original
        self.params, self.buffers = [], []


class LayerwiseRun:
    """Record, walk and (optionally) tail as described in the module docstring; a context manager that
    moves the shell to ``device`` on entry and back on exit.

    Args:
        model: the HF model (any device; meta weights are refused by the callers).
        layers: ``[(name, layer)]`` of its decoder layers, in order.
        batches: token-id tensors ``[b, T]``.
        device: the execution device.
        run: ``run(model, batch)`` calls the model (``calibration.run_model``).
    """

    def __init__(self, model: nn.Module, layers, batches, device, run):
        self.model, self.layers, self.batches = model, list(layers), list(batches)
        self.device, self.run = torch.device(device), run
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.calls: list[list[tuple[tuple, dict]]] = []  # [batch][layer] -> (args, kwargs), hidden removed
        self.inputs: list = []                           # the first layer's hidden states per batch
        self.template = None                             # a real layer output (its structure)
        self._shell: _Moved | None = None

    mover = _Moved  # how weights go to the device and back (a test swaps in one that copies on the CPU)

    # ---------------------------------------------------------------------------------------- shell
    def __enter__(self) -> "LayerwiseRun":
        inside = {id(m) for _, layer in self.layers for m in layer.modules()}
        self._shell = self.mover([m for m in self.model.modules() if id(m) not in inside], self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self._shell is not None:
            self._shell.restore()
            self._shell = None
        self.calls, self.inputs, self.template = [], [], None

    @contextlib.contextmanager
    def _stubbed(self, make_stub):
        """Every decoder layer's ``forward`` replaced by ``make_stub(i)`` (an instance attribute) inside."""
        saved = [layer.__dict__.get("forward") for _, layer in self.layers]  # e.g. an accelerate hook's
        try:
            for i, (_, layer) in enumerate(self.layers):
                layer.forward = make_stub(i)
            yield
        finally:
            for (_, layer), forward in zip(self.layers, saved):
                if forward is None:
                    layer.__dict__.pop("forward", None)
                else:
                    layer.forward = forward

    # --------------------------------------------------------------------------------------- record
    def record(self) -> None:
        """Step 1: every layer's call on every batch (nothing of the layers' weights is read)."""
        last = len(self.layers) - 1
        for batch in self.batches:
            calls: dict[int, tuple[tuple, dict]] = {}

            def make_stub(i, calls=calls):
                def stub(*args, **kwargs):
                    hidden = hidden_in(args, kwargs)
                    if i == 0:
                        self.inputs.append(hidden)
                    calls[i] = with_hidden(args, kwargs, None)
                    if i == last:
                        raise _StopForward
                    return hidden
                return stub

            with self._stubbed(make_stub):
                try:
                    self.run(self.model, batch.to(self.device))
                except _StopForward:
                    pass
            if len(calls) != len(self.layers):
                raise RuntimeError(f"layer-by-layer run: the model called {len(calls)} of its {len(self.layers)} "
                                   f"decoder layers; it cannot be run one layer at a time")
            self.calls.append([calls[i] for i in range(len(self.layers))])

    # ----------------------------------------------------------------------------------------- walk
    def walk(self, visit=None, progress: bool = False, desc: str = "layers") -> list:
        """Step 2: each layer on its device in turn, on every batch. ``visit(name, layer, inputs, outputs)``
        (optional) runs while the layer is on the device, with ``inputs`` the per-batch ``(args, kwargs)``
        calls and ``outputs`` the layer's hidden-state outputs. Returns the last layer's outputs."""
        if not self.calls or not self.inputs:  # a second walk records the calls again (the first released them)
            self.calls, self.inputs = [], []
            self.record()
        hidden, self.inputs = self.inputs, []  # released after layer 0: two sets of hidden states at a time
        iterator = self.layers
        if progress:
            from tqdm.auto import tqdm
            iterator = tqdm(self.layers, desc=desc, unit="layer")
        for i, (name, layer) in enumerate(iterator):
            moved = self.mover(list(layer.modules()), self.device)
            try:
                inputs = [with_hidden(*self.calls[b][i], hidden[b]) for b in range(len(self.batches))]
                outputs = []
                for args, kwargs in inputs:
                    out = layer(*args, **kwargs)
                    self.template = out
                    outputs.append(hidden_out(out))
                if visit is not None:
                    visit(name, layer, inputs, outputs)
            finally:
                moved.restore()
            hidden = outputs
            del inputs, outputs  # the layer's inputs go before the next layer's are built
        return hidden

    # ----------------------------------------------------------------------------------------- tail
    def tail(self, final: list) -> None:
        """Step 3: the model after its decoder layers (final norm, head) on the last layer's ``final``
        outputs, batch by batch."""
        for b, batch in enumerate(self.batches):
            def make_stub(i, b=b):
                def stub(*args, **kwargs):
                    return _like(self.template, final[b])
                return stub
            with self._stubbed(make_stub):
                self.run(self.model, batch.to(self.device))


__all__ = ["LayerwiseRun", "hidden_in", "hidden_out", "with_hidden"]
