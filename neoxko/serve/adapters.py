"""Many LoRA adapters over one base model, unmerged: each row of a batch runs with its own adapter, or none.

Every adapted linear layer holds the low-rank factors of all resident adapters side by side, A (slots * r, in) and
B (out, slots * r), each adapter's scaling folded into its B. For one forward the rows' slots become a selector
(B, 1, slots * r) of ones over each row's own block; the layer adds ((x A^T) * selector) B^T to its base output:
two small dense products per layer whatever mix of adapters the batch holds (no per-adapter batches, no gather),
and a row without an adapter has an all-zero selector, so it gets the base output exactly. An adapter that does not
adapt a layer has zeros there; r is the largest rank resident, smaller ranks padded with zeros.

Registered adapters are kept in host memory, read from their folders and checked against the model once; at most
max_loras are resident in the slots. The engine places a request's adapter in a slot when it admits the request,
evicting the least recently used adapter that no running request holds, and only on its own thread, between
forwards.
"""

import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neoxko.errors import CheckpointError, NeoxkoError
from neoxko.finetune.lora import Wrapped, check_ranks, check_tensors, is_lora_key, read_adapter, target_layers

_uids = itertools.count(1)


class AdapterError(NeoxkoError):
    """An adapter cannot be served: unknown, already loaded, or not servable unmerged. field: the request field at
    fault (lora_name, lora_path)."""

    def __init__(self, message: str, field: str = "lora_path"):
        super().__init__(message)
        self.field = field


@dataclass(eq=False)
class Adapter:
    name: str
    folder: Path
    rank: int  # its largest layer rank
    layers: dict[str, tuple[Tensor, Tensor]]  # layer name -> (A (r, in), scaling * B (out, r)), float32, host memory
    uid: int = field(default_factory=lambda: next(_uids))  # a new load of the same name is another adapter
    removed: bool = False  # unloaded: requests already holding it finish with it, new ones cannot name it


class MultiLoRALinear(Wrapped):
    """A base linear layer plus the low-rank updates of the resident adapters, chosen per row by slots.selector."""

    def __init__(self, base: nn.Module, slots: "AdapterSlots"):
        super().__init__()
        self.base_layer = base
        self.slots = [slots]  # (a list: not a submodule)
        device = base.weight.device
        width = slots.max_loras * slots.rank
        self.register_buffer("lora_A", torch.zeros(width, base.in_features, device=device), persistent=False)
        self.register_buffer("lora_B", torch.zeros(base.out_features, width, device=device), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        selector = self.slots[0].selector
        if selector is None:
            return y
        h = F.linear(x.to(self.lora_A.dtype), self.lora_A) * selector
        return y + F.linear(h, self.lora_B).to(y.dtype)


class AdapterSlots:
    """The adapters a server knows (by name) and the max_loras slots that hold some of them in the model."""

    def __init__(self, model: nn.Module, max_loras: int = 4, max_rank: int = 64):
        if max_loras < 1 or max_rank < 1:
            raise NeoxkoError(f"--max-loras and --max-lora-rank must be at least 1, got {max_loras} and {max_rank}")
        self.model, self.max_loras, self.max_rank = model, max_loras, max_rank
        self.rank = 1  # the slots' width per adapter: the largest rank resident so far
        self.adapters: dict[str, Adapter] = {}  # registered, by name
        self.lock = threading.Lock()  # the registry: HTTP threads add and remove, the engine reads
        self.resident: OrderedDict[int, Adapter | None] = OrderedDict((i, None) for i in range(max_loras))  # LRU
        self.holders = [0] * max_loras  # running requests using each slot
        self.reserved: dict[int, Adapter] = {}  # slot -> the adapter that waits for it: it takes no new requests
        self.wrapped: dict[str, MultiLoRALinear] = {}
        self.selector: Tensor | None = None
        self.linear = {name: module for name, module in model.named_modules()
                       if hasattr(module, "in_features") and name != "embed_out"}
        self.evictions = 0

    # -- the registry (any thread) ------------------------------------------------------------
    def register(self, name: str, folder: str | Path, replace: bool = False) -> Adapter:
        """Read and check the adapter in folder under name; the server can then run requests with it. replace: a
        loaded adapter of that name gives way (its running requests finish with it; vLLM's load_inplace)."""
        taken = f"an adapter named {name!r} is already loaded; unload it first, pick another name, or send " \
                "load_inplace: true to replace it"
        with self.lock:
            if name in self.adapters and not replace:
                raise AdapterError(taken, "lora_name")
        adapter = self.read(name, Path(folder))
        with self.lock:
            if name in self.adapters and not replace:
                raise AdapterError(taken, "lora_name")
            old = self.adapters.get(name)
            self.adapters[name] = adapter
        if old is not None:
            old.removed = True
        return adapter

    def unregister(self, name: str) -> None:
        with self.lock:
            adapter = self.adapters.pop(name, None)
        if adapter is None:
            raise AdapterError(f"no adapter named {name!r} is loaded", "lora_name")
        adapter.removed = True

    def get(self, name: str) -> Adapter | None:
        with self.lock:
            return self.adapters.get(name)

    def names(self) -> list[str]:
        with self.lock:
            return list(self.adapters)

    def read(self, name: str, folder: Path) -> Adapter:
        if not name or name.strip() != name or not name.isprintable():
            raise AdapterError(f"an adapter name must be a non-empty name without surrounding spaces or control "
                               f"characters, got {name!r}", "lora_name")
        settings, state, _ = read_adapter(folder)
        if settings.dora:
            raise AdapterError(f"{folder} is a DoRA adapter, which rescales whole weight rows and cannot be served "
                               f"unmerged; serve it merged on its own: neoxko serve --model {folder} (an adapter "
                               "folder loads merged into its base)")
        saved = sorted(n for n in state if not is_lora_key(n))
        if saved:
            raise AdapterError(f"{folder} replaces whole modules ({', '.join(saved)}: peft's modules_to_save), which "
                               f"cannot be served unmerged; serve it merged on its own: neoxko serve --model {folder} "
                               "(an adapter folder loads merged into its base)")
        check_ranks(settings, state, folder)
        try:
            layers = [name_ for name_, _ in target_layers(self.linear.items(), settings)]
        except NeoxkoError as e:
            raise CheckpointError(f"the adapter in {folder} does not fit this model: {e}") from None
        check_tensors(layers, settings, state, folder)
        tensors = {}
        for layer in layers:
            a, b = state[f"{layer}.lora_A.weight"].float(), state[f"{layer}.lora_B.weight"].float()
            module = self.linear[layer]
            if a.shape[1] != module.in_features or b.shape[0] != module.out_features:
                raise CheckpointError(f"the adapter in {folder} has {layer} of shape {tuple(b.shape)} x "
                                      f"{tuple(a.shape)}, but this model's layer is {module.out_features} x "
                                      f"{module.in_features}; was it trained on another base model?")
            tensors[layer] = (a.contiguous(), (b * settings.scaling_for(layer)).contiguous())
        rank = max(a.shape[0] for a, _ in tensors.values())
        if rank > self.max_rank:
            raise AdapterError(f"{folder} has rank {rank}; this server serves adapters of rank at most "
                               f"{self.max_rank} (--max-lora-rank)")
        return Adapter(name, folder, rank, tensors)

    # -- the slots (the engine thread) --------------------------------------------------------
    def acquire(self, adapter: Adapter) -> int | None:
        """The slot holding adapter, placing it (evicting the least recently used idle adapter) if it is not
        resident; None when it must wait. A waiting adapter reserves the least recently used busy slot: that one's
        adapter takes no new requests until it drains, so the wait ends however busy the others are."""
        slot = next((s for s, a in self.resident.items() if a is adapter), None)
        if slot is not None and self.reserved.get(slot, adapter) is not adapter:
            return None  # draining for the adapter that waits for it
        if slot is None:
            mine = next((s for s, a in self.reserved.items() if a is adapter), None)
            idle = [s for s, a in self.resident.items() if self.holders[s] == 0 and self.reserved.get(s, adapter)
                    is adapter]  # least recently used first
            if mine is not None:
                idle = [mine] if self.holders[mine] == 0 else []
            if not idle:
                if mine is None:
                    free = [s for s in self.resident if s not in self.reserved]
                    if free:
                        self.reserved[free[0]] = adapter
                return None
            slot = next((s for s in idle if self.resident[s] is None or self.resident[s].removed), idle[0])
            self.reserved.pop(slot, None)
            self.evictions += self.resident[slot] is not None
            self._place(adapter, slot)
        self.resident.move_to_end(slot)
        self.holders[slot] += 1
        return slot

    def keep_reservations(self, waiting: set) -> None:
        """Drop the reservations of adapters no request waits for any more (they were cancelled)."""
        self.reserved = {s: a for s, a in self.reserved.items() if a in waiting}

    def release(self, slot: int | None) -> None:
        if slot is not None:
            self.holders[slot] -= 1

    def select(self, slots: list[int | None]) -> None:
        """Set the rows' adapters for the next forward (None: the base model)."""
        if all(s is None for s in slots):
            self.selector = None
            return
        device = next(iter(self.wrapped.values())).lora_A.device
        selector = torch.zeros(len(slots), 1, self.max_loras, self.rank, device=device)
        for row, slot in enumerate(slots):
            if slot is not None:
                selector[row, :, slot] = 1
        self.selector = selector.view(len(slots), 1, -1)

    def _place(self, adapter: Adapter, slot: int) -> None:
        if adapter.rank > self.rank:
            self._widen(adapter.rank)
        for layer in adapter.layers:
            if layer not in self.wrapped:
                self._wrap(layer)
        block = slice(slot * self.rank, (slot + 1) * self.rank)
        for layer, module in self.wrapped.items():
            module.lora_A[block].zero_()
            module.lora_B[:, block].zero_()
            if layer in adapter.layers:
                a, b = adapter.layers[layer]
                module.lora_A[block][:a.shape[0]].copy_(a)
                module.lora_B[:, block][:, :b.shape[1]].copy_(b)
        self.resident[slot] = adapter

    def _wrap(self, layer: str) -> None:
        parent, _, child = layer.rpartition(".")
        module = MultiLoRALinear(self.linear[layer], self)
        setattr(self.model.get_submodule(parent), child, module)
        self.wrapped[layer] = module

    def _widen(self, rank: int) -> None:
        """Make every slot rank wide, keeping the resident adapters' factors in their slots."""
        old = self.rank
        for module in self.wrapped.values():
            a = module.lora_A.new_zeros(self.max_loras, rank, module.in_features)
            b = module.lora_B.new_zeros(module.out_features, self.max_loras, rank)
            a[:, :old] = module.lora_A.view(self.max_loras, old, -1)
            b[:, :, :old] = module.lora_B.view(-1, self.max_loras, old)
            module.lora_A, module.lora_B = a.view(-1, module.in_features), b.view(module.out_features, -1)
        self.rank = rank

