"""Device-addressable views of pinned host memory: compiled code reads host-resident experts directly.

On CUDA, pinned host memory is mapped into the device's address space (unified virtual addressing),
so a kernel can load from it over PCIe without a copy first. JAX has no public way to say so; this
module hands XLA the pinned buffer's address as a *device* buffer through DLPack. The view aliases the
owner's memory (no copy) and keeps the owner alive. On the CPU backend host and device memory are one,
so the same call gives an ordinary aliasing view and the code paths that use it run unchanged.
"""

from __future__ import annotations

import atexit
import ctypes
import weakref

import jax
import numpy as np

_DLPACK_CODE = {"f": 2, "i": 0, "u": 1, "V": 4}  # kDLFloat, kDLInt, kDLUInt, kDLBfloat (bf16 is 'V')
_KDL_CPU, _KDL_CUDA, _KDL_CUDA_HOST = 1, 2, 3


class _DLDevice(ctypes.Structure):
  _fields_ = [("device_type", ctypes.c_int), ("device_id", ctypes.c_int)]


class _DLDataType(ctypes.Structure):
  _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
  _fields_ = [("data", ctypes.c_void_p), ("device", _DLDevice), ("ndim", ctypes.c_int),
              ("dtype", _DLDataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
              ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class _DLManagedTensor(ctypes.Structure):
  pass


_DELETER = ctypes.CFUNCTYPE(None, ctypes.POINTER(_DLManagedTensor))
_DLManagedTensor._fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p),
                             ("deleter", _DELETER)]

# tensors handed to XLA, kept alive (with their shape arrays and owners) until XLA calls the deleter
_LIVE: dict[int, tuple] = {}


@_DELETER
def _release(managed):
  _LIVE.pop(ctypes.addressof(managed.contents), None)


_VIEWS: dict[int, weakref.ref] = {}  # the views not yet freed (arrays are not hashable)


@atexit.register
def _free_views():
  """A view still alive when the interpreter is torn down crashes the process as it ends (its buffer
  outlives the runtime): free every view at exit, while the interpreter still runs."""
  for ref in list(_VIEWS.values()):
    view = ref()
    if view is not None and not view.is_deleted():
      view.delete()


_PyCapsule_New = ctypes.pythonapi.PyCapsule_New
_PyCapsule_New.restype = ctypes.py_object
_PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


class _Exported:
  """The two methods `jax.dlpack.from_dlpack` asks of a producer."""

  def __init__(self, capsule, device_type: int, device_id: int):
    self._capsule, self._device = capsule, (device_type, device_id)

  def __dlpack__(self, stream=None, **_):
    return self._capsule

  def __dlpack_device__(self):
    return self._device


def _dtype_code(dtype: np.dtype) -> _DLDataType:
  dtype = np.dtype(dtype)
  code = 4 if dtype.name == "bfloat16" else _DLPACK_CODE[dtype.kind]
  return _DLDataType(code, dtype.itemsize * 8, 1)


def device_view(owner: jax.Array, shape: tuple[int, ...], dtype, byte_offset: int = 0, *,
                memory_kind: str = "device") -> jax.Array:
  """An array of `shape`/`dtype` over the bytes of `owner` (a single-device array in pinned host
  memory) from `byte_offset` on (a multiple of 64). `memory_kind="device"`: compiled code reads it as
  device memory, across PCIe on a GPU; it must never be written (XLA would write host memory) nor
  donated. `"pinned_host"` (GPU only): a host array over part of `owner`, e.g. one expert to copy."""
  dtype = np.dtype(dtype)
  device = next(iter(owner.devices()))
  if memory_kind == "pinned_host" and device.platform != "gpu":
    raise NotImplementedError("pinned host views of part of an array need a GPU backend")
  if device.platform != "gpu":
    device_type = _KDL_CPU
  else:
    device_type = _KDL_CUDA_HOST if memory_kind == "pinned_host" else _KDL_CUDA
  return _view(owner, shape, dtype, byte_offset, device_type, device.local_hardware_id or 0)


def cpu_view(owner: jax.Array, shape: tuple[int, ...], dtype, byte_offset: int = 0) -> jax.Array:
  """An array of the CPU backend over the bytes of `owner` (a single-device array in host memory:
  pinned on a GPU) from `byte_offset` on (a multiple of 64), for compute on the host CPU next to the
  data; no copy. It must never be written nor donated."""
  dtype = np.dtype(dtype)
  if byte_offset % 64:
    raise ValueError(f"a CPU view must start at a multiple of 64 bytes, got {byte_offset}")
  return _view(owner, shape, dtype, byte_offset, _KDL_CPU, 0)


def _view(owner: jax.Array, shape: tuple[int, ...], dtype: np.dtype, byte_offset: int,
          device_type: int, device_id: int) -> jax.Array:
  """The DLPack handover of `device_view` and `cpu_view`: `owner` stays alive as long as the view."""
  nbytes = int(np.prod(shape)) * dtype.itemsize
  if byte_offset + nbytes > owner.nbytes:
    raise ValueError(f"a view of {nbytes} bytes at {byte_offset} exceeds its owner's {owner.nbytes}")
  pointer = owner.unsafe_buffer_pointer() + byte_offset
  dims = (ctypes.c_int64 * len(shape))(*shape)
  managed = _DLManagedTensor()
  managed.dl_tensor = _DLTensor(pointer, _DLDevice(device_type, device_id), len(shape),
                                _dtype_code(dtype), dims, None, 0)
  managed.deleter = _release
  _LIVE[ctypes.addressof(managed)] = (managed, dims, owner)
  capsule = _PyCapsule_New(ctypes.addressof(managed), b"dltensor", None)
  view = jax.dlpack.from_dlpack(_Exported(capsule, device_type, device_id), copy=False)
  key = id(view)
  _VIEWS[key] = weakref.ref(view, lambda _: _VIEWS.pop(key, None))
  return view
