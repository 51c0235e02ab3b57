//! Views of memory we own bound to the session without copies: the KV buffers, logits, token ids and mask.
//!
//! ort's safe `bind_input` clones any borrowed tensor (a copy of the whole KV cache per step), so views are bound
//! through the C API directly. The views and their binding live together; the owner of the memory keeps it in place
//! while they exist (the model drops every binding before it moves or frees a buffer).

use crate::core::ModelError;
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{IoBinding, Session};
use ort::value::{PrimitiveTensorElementType, Shape, TensorRefMut};
use ort::AsPointer;
use std::ffi::{CStr, CString};

/// A failure of the ORT C API.
pub fn backend(e: impl std::fmt::Display) -> ModelError {
    ModelError::Backend(e.to_string())
}

/// A binding whose inputs and outputs are views of caller-owned memory.
pub struct ViewBinding {
    binding: IoBinding,
    f32_views: Vec<TensorRefMut<'static, f32>>,
    i64_views: Vec<TensorRefMut<'static, i64>>,
}

/// The session's input or output side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// A graph input.
    Input,
    /// A graph output (written in place).
    Output,
}

/// A view of `len = shape.product()` elements at `data`.
///
/// # Safety
/// `data` must point to at least that many elements that stay valid (and are not moved) while the view exists.
unsafe fn view<T: PrimitiveTensorElementType + std::fmt::Debug>(
    data: *mut T,
    shape: &[usize],
) -> Result<TensorRefMut<'static, T>, ModelError> {
    let info =
        MemoryInfo::new(AllocationDevice::CPU, 0, AllocatorType::Device, MemoryType::Default).map_err(backend)?;
    let shape = Shape::new(shape.iter().map(|&d| d as i64));
    // SAFETY: the caller guarantees the memory outlives the view.
    unsafe { TensorRefMut::from_raw(info, data.cast(), shape) }.map_err(backend)
}

fn bind(binding: &mut IoBinding, name: &CStr, value: *const ort::sys::OrtValue, side: Side) -> Result<(), ModelError> {
    let api = ort::api();
    // SAFETY: binding and value are live ORT objects; ORT copies the name.
    let status = unsafe {
        match side {
            Side::Input => (api.BindInput)(binding.ptr_mut(), name.as_ptr(), value),
            Side::Output => (api.BindOutput)(binding.ptr_mut(), name.as_ptr(), value),
        }
    };
    // SAFETY: the status comes straight from the API call above.
    unsafe { ort::Error::result_from_status(status) }.map_err(backend)
}

impl ViewBinding {
    /// An empty binding for `session`.
    pub fn new(session: &Session) -> Result<Self, ModelError> {
        Ok(Self {
            binding: session.create_binding().map_err(backend)?,
            f32_views: Vec::new(),
            i64_views: Vec::new(),
        })
    }

    /// Binds `shape` elements at `data` to `name`; the view is kept with the binding.
    ///
    /// # Safety
    /// The memory must stay valid and in place while this binding exists (or until `name` is bound again).
    pub unsafe fn bind_f32(
        &mut self,
        name: &CStr,
        data: *mut f32,
        shape: &[usize],
        side: Side,
    ) -> Result<(), ModelError> {
        // SAFETY: forwarded from the caller.
        let v = unsafe { view(data, shape) }?;
        bind(&mut self.binding, name, v.ptr(), side)?;
        self.f32_views.push(v);
        Ok(())
    }

    /// Binds an int64 input view, replacing the previous view of the same input (per-step token ids and mask).
    ///
    /// # Safety
    /// As for [`ViewBinding::bind_f32`].
    pub unsafe fn bind_i64_input(
        &mut self,
        slot: usize,
        name: &CStr,
        data: *mut i64,
        shape: &[usize],
    ) -> Result<(), ModelError> {
        // SAFETY: forwarded from the caller.
        let v = unsafe { view(data, shape) }?;
        bind(&mut self.binding, name, v.ptr(), Side::Input)?;
        if self.i64_views.len() <= slot {
            self.i64_views.push(v);
        } else {
            self.i64_views[slot] = v; // ORT now refers to the new view; the old one may go
        }
        Ok(())
    }

    /// Runs the session on this binding.
    pub fn run(&self, session: &mut Session) -> Result<(), ModelError> {
        session.run_binding(&self.binding).map(drop).map_err(backend)
    }
}

/// A C string for a graph input or output name.
pub fn c_name(name: &str) -> Result<CString, ModelError> {
    CString::new(name).map_err(|_| ModelError::Backend(format!("graph name {name:?} contains a NUL byte")))
}
