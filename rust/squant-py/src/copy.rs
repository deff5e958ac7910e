//! `copy_tree`: the deep copy of a module tree behind `quantize_model`'s
//! copy of the model (`_Copier.copy` in `squant_rs.model.layers`). Plain
//! modules are rebuilt as `deepcopy` rebuilds them, their dictionaries,
//! tuples and sets, parameters and plain CPU buffers copied here, with
//! `deepcopy`'s memo kept as `deepcopy` keeps it; anything else goes back to
//! the Python copier (`_other`, that is `deepcopy` with the same memo).

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyFrozenSet, PySet, PyString, PyTuple, PyType};

/// References to a value of a module's `__dict__` while [`CopyCtx::module`]
/// looks at it when nothing else holds it: the `__dict__`, the state copy
/// and the loop's own.
const ONLY_HERE: isize = 3;

/// What [`copy_tree`] needs from its Python copier (`_Copier` in
/// `squant_rs.model.layers`), looked up once per call.
struct CopyCtx<'py> {
    py: Python<'py>,
    memo: Bound<'py, PyDict>,
    atomic: Bound<'py, PyFrozenSet>,
    plain: Bound<'py, PyDict>,
    module: Bound<'py, PyAny>,
    odict: Bound<'py, PyAny>,
    set_state: Bound<'py, PyAny>,
    state_keys: Bound<'py, PyFrozenSet>,
    tensor: Bound<'py, PyAny>,
    parameter: Bound<'py, PyAny>,
    strided: Bound<'py, PyAny>,
    make_subclass: Bound<'py, PyAny>,
    copier: Bound<'py, PyAny>,
    /// Nesting of [`CopyCtx::copy`] calls (see [`MAX_DEPTH`]).
    depth: std::cell::Cell<usize>,
}

/// Deeper than this, values go to `deepcopy` (Python's recursion limit
/// then applies, as it would without this walk) instead of growing the
/// native stack.
const MAX_DEPTH: usize = 200;

impl<'py> CopyCtx<'py> {
    fn is_atomic(&self, obj: &Bound<'py, PyAny>) -> PyResult<bool> {
        self.atomic.contains(obj.get_type())
    }

    /// `id(obj)`, as the memo's key.
    fn key(obj: &Bound<'py, PyAny>) -> usize {
        obj.as_ptr() as usize
    }

    fn remember(&self, obj: &Bound<'py, PyAny>, copy: &Bound<'py, PyAny>) -> PyResult<()> {
        self.memo.set_item(Self::key(obj), copy)
    }

    /// `_Copier.copy`: the same branches in the same order; tensors,
    /// parameters and everything else go back to the Python copier.
    fn copy(&self, obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        if self.is_atomic(obj)? {
            return Ok(obj.clone());
        }
        if let Some(y) = self.memo.get_item(Self::key(obj))? {
            return Ok(y);
        }
        let depth = self.depth.get();
        if depth >= MAX_DEPTH {
            return self.copier.call_method1("_other", (obj,));
        }
        self.depth.set(depth + 1);
        let out = self.copy_new(obj);
        self.depth.set(depth);
        out
    }

    /// [`CopyCtx::copy`] of a value not copied yet.
    fn copy_new(&self, obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let cls = obj.get_type();
        if obj.is_exact_instance_of::<PyDict>() || cls.is(&self.odict) {
            let d = cls.call0()?;
            self.remember(obj, &d)?;
            let src = obj.cast::<PyDict>()?;
            for (k, v) in src.iter() {
                let key = if k.is_exact_instance_of::<PyString>() {
                    k
                } else {
                    self.copy(&k)?
                };
                let val = if self.is_atomic(&v)? {
                    v
                } else {
                    self.copy(&v)?
                };
                d.set_item(key, val)?;
            }
            return Ok(d);
        }
        if let Ok(t) = obj.cast_exact::<PyTuple>() {
            if self.all_atomic(t.iter())? {
                return Ok(obj.clone());
            }
            let mut items = Vec::with_capacity(t.len());
            let mut same = true;
            for v in t.iter() {
                let c = self.copy(&v)?;
                same &= c.is(&v);
                items.push(c);
            }
            if same {
                return Ok(obj.clone());
            }
            let c = PyTuple::new(self.py, items)?.into_any();
            self.remember(obj, &c)?;
            return Ok(c);
        }
        if let Ok(s) = obj.cast_exact::<PySet>() {
            if self.all_atomic(s.iter())? {
                let c = PySet::new(self.py, s.iter())?.into_any();
                self.remember(obj, &c)?;
                return Ok(c);
            }
        }
        if cls.is(&self.tensor) {
            if let Some(c) = self.buffer(obj)? {
                return Ok(c);
            }
        } else if cls.is(&self.parameter) {
            if self.no_dict(obj)? {
                // Parameter.__deepcopy__ exactly (Parameter.__new__ of a
                // plain tensor is this _make_subclass).
                let py = self.py;
                let data = obj
                    .getattr(intern!(py, "data"))?
                    .call_method0(intern!(py, "clone"))?;
                let rg = obj.getattr(intern!(py, "requires_grad"))?;
                let p = self.make_subclass.call1((cls, data, rg))?;
                self.remember(obj, &p)?;
                return Ok(p);
            }
        } else if obj.is_instance(&self.module)? && self.is_plain(&cls)? {
            return self.module(obj, &cls);
        }
        self.copier.call_method1("_other", (obj,))
    }

    /// An instance `__dict__` that is empty (or absent).
    fn no_dict(&self, obj: &Bound<'py, PyAny>) -> PyResult<bool> {
        match obj.getattr(intern!(self.py, "__dict__")) {
            Ok(d) => Ok(d.len()? == 0),
            Err(_) => Ok(true),
        }
    }

    /// `_Copier._buffer`: a plain, dense, contiguous CPU tensor that owns
    /// all of its storage, cloned, its storage recorded in the memo as
    /// `Tensor.__deepcopy__` does; else `None` (deepcopy's way).
    fn buffer(&self, t: &Bound<'py, PyAny>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let py = self.py;
        let flag = |name: &Bound<'py, PyString>| -> PyResult<bool> { t.getattr(name)?.is_truthy() };
        let call =
            |name: &Bound<'py, PyString>| -> PyResult<Bound<'py, PyAny>> { t.call_method0(name) };
        if flag(intern!(py, "requires_grad"))?
            || !t.getattr(intern!(py, "layout"))?.is(&self.strided)
            || !flag(intern!(py, "is_cpu"))?
            || flag(intern!(py, "is_quantized"))?
            || call(intern!(py, "is_conj"))?.is_truthy()?
            || call(intern!(py, "is_neg"))?.is_truthy()?
            || call(intern!(py, "storage_offset"))?.extract::<i64>()? != 0
            || !call(intern!(py, "is_contiguous"))?.is_truthy()?
            || !self.no_dict(t)?
        {
            return Ok(None);
        }
        let storage = call(intern!(py, "untyped_storage"))?;
        let nbytes = storage
            .call_method0(intern!(py, "nbytes"))?
            .extract::<u64>()?;
        let numel = call(intern!(py, "numel"))?.extract::<u64>()?;
        let size = call(intern!(py, "element_size"))?.extract::<u64>()?;
        if numel.checked_mul(size) != Some(nbytes) {
            return Ok(None);
        }
        let seen = self
            .memo
            .call_method1(intern!(py, "setdefault"), ("torch", PyDict::new(py)))?;
        let seen = seen.cast::<PyDict>()?;
        let cdata = storage.getattr(intern!(py, "_cdata"))?;
        if seen.contains(&cdata)? {
            return Ok(None); // shared with another tensor: deepcopy's way
        }
        let new = call(intern!(py, "clone"))?;
        seen.set_item(cdata, new.call_method0(intern!(py, "untyped_storage"))?)?;
        self.remember(t, &new)?;
        Ok(Some(new))
    }

    fn all_atomic(&self, items: impl Iterator<Item = Bound<'py, PyAny>>) -> PyResult<bool> {
        for v in items {
            if !self.is_atomic(&v)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn is_plain(&self, cls: &Bound<'py, PyType>) -> PyResult<bool> {
        if let Some(ok) = self.plain.get_item(cls)? {
            return ok.is_truthy();
        }
        self.copier.call_method1("_is_plain", (cls,))?.is_truthy()
    }

    /// `_Copier._module`: a new instance, the module's `__getstate__`
    /// deep-copied (empty containers inline), then `__setstate__` (a dict
    /// update when it is `nn.Module`'s and every key it would add is there).
    fn module(
        &self,
        obj: &Bound<'py, PyAny>,
        cls: &Bound<'py, PyType>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let m = cls.call_method1(intern!(self.py, "__new__"), (cls,))?;
        self.remember(obj, &m)?;
        // The state dict is a fresh temporary: copied without a memo entry.
        let state = obj.call_method0(intern!(self.py, "__getstate__"))?;
        let new = state.cast::<PyDict>()?;
        let items: Vec<_> = new.iter().collect();
        for (k, v) in items {
            if self.is_atomic(&v)? {
                continue;
            }
            let vt = v.get_type();
            let container = v.is_exact_instance_of::<PyDict>()
                || vt.is(&self.odict)
                || v.is_exact_instance_of::<PySet>();
            if container && v.len()? == 0 && v.get_refcnt() <= ONLY_HERE {
                // Reachable only through this module (its `__dict__`, the
                // state copy and `v`): no other path can meet it again, so
                // it needs no memo entry (most hook dictionaries).
                new.set_item(k, vt.call0()?)?;
            } else if container && v.len()? == 0 && self.memo.get_item(Self::key(&v))?.is_none() {
                let c = vt.call0()?;
                self.remember(&v, &c)?;
                new.set_item(k, c)?;
            } else if let Ok(t) = v.cast_exact::<PyTuple>() {
                if !self.all_atomic(t.iter())? {
                    new.set_item(k, self.copy(&v)?)?;
                } // kernel sizes, strides...: deepcopy keeps them
            } else {
                new.set_item(k, self.copy(&v)?)?;
            }
        }
        let setstate = cls.getattr(intern!(self.py, "__setstate__"))?;
        if setstate.is(&self.set_state)
            && self
                .state_keys
                .iter()
                .all(|k| new.contains(k).unwrap_or(false))
        {
            m.getattr(intern!(self.py, "__dict__"))?
                .call_method1(intern!(self.py, "update"), (new,))?;
        } else {
            m.call_method1(intern!(self.py, "__setstate__"), (new,))?;
        }
        Ok(m)
    }
}

/// copy_tree(obj, copier)
/// --
///
/// `copier.copy(obj)` of `squant_rs.model.layers._Copier`, with the module
/// tree, its dictionaries, tuples and sets walked here; tensors,
/// parameters and anything else go to `copier._other`. Uses and fills
/// `copier.memo` (deepcopy's memo).
#[pyfunction]
pub fn copy_tree<'py>(
    obj: &Bound<'py, PyAny>,
    copier: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    let py = obj.py();
    let get = |name: &str| copier.getattr(name);
    let ctx = CopyCtx {
        py,
        memo: get("memo")?.cast_into::<PyDict>()?,
        atomic: get("atomic")?.cast_into::<PyFrozenSet>()?,
        plain: get("plain")?.cast_into::<PyDict>()?,
        module: get("module")?,
        odict: get("odict")?,
        set_state: get("set_state")?,
        state_keys: get("state_keys")?.cast_into::<PyFrozenSet>()?,
        tensor: get("tensor")?,
        parameter: get("parameter")?,
        strided: get("strided")?,
        make_subclass: get("make_subclass")?,
        copier: copier.clone(),
        depth: std::cell::Cell::new(0),
    };
    ctx.copy(obj)
}
