//! Reading a document as it was: the slot reads the JSON conversion needs ([`Slots`]), for
//! the current state (any Automerge [`ReadDoc`]) and for a past state ([`At`]: the same
//! document read through Automerge's `*_at(heads)` methods).
//!
//! Reading through the `*_at` methods costs what reading the current state costs plus the
//! clock of the heads; forking the document at those heads instead would replay its whole
//! history up to them. So `get --at`, `diff` and `revert --to` read the past in place.

use automerge::{AutomergeError, ChangeHash, ObjId, ObjType, Prop, ReadDoc, Value};

/// The reads `json::read` makes, implemented for the current state of any document and for
/// a past state ([`At`]).
pub(crate) trait Slots {
    /// Length of a list or text.
    fn len_of(&self, obj: &ObjId) -> usize;
    /// The winning value in one slot.
    fn slot(&self, obj: &ObjId, prop: Prop) -> Result<Option<(Value<'_>, ObjId)>, AutomergeError>;
    /// Every concurrent value in one slot (the winner last, as Automerge returns them).
    fn slot_all(&self, obj: &ObjId, prop: Prop) -> Result<Vec<(Value<'_>, ObjId)>, AutomergeError>;
    /// Type of an object.
    fn type_of(&self, obj: &ObjId) -> Result<ObjType, AutomergeError>;
    /// Keys of a map.
    fn keys_of(&self, obj: &ObjId) -> Vec<String>;
    /// Content of a text object.
    fn text_of(&self, obj: &ObjId) -> Result<String, AutomergeError>;
}

impl<R: ReadDoc> Slots for R {
    fn len_of(&self, obj: &ObjId) -> usize {
        self.length(obj)
    }
    fn slot(&self, obj: &ObjId, prop: Prop) -> Result<Option<(Value<'_>, ObjId)>, AutomergeError> {
        self.get(obj, prop)
    }
    fn slot_all(&self, obj: &ObjId, prop: Prop) -> Result<Vec<(Value<'_>, ObjId)>, AutomergeError> {
        self.get_all(obj, prop)
    }
    fn type_of(&self, obj: &ObjId) -> Result<ObjType, AutomergeError> {
        self.object_type(obj)
    }
    fn keys_of(&self, obj: &ObjId) -> Vec<String> {
        self.keys(obj).collect()
    }
    fn text_of(&self, obj: &ObjId) -> Result<String, AutomergeError> {
        self.text(obj)
    }
}

/// A document read as of `heads` (which the caller has checked are all in the document).
pub(crate) struct At<'a, R: ReadDoc> {
    /// The document.
    pub(crate) doc: &'a R,
    /// The state to read.
    pub(crate) heads: &'a [ChangeHash],
}

impl<R: ReadDoc> Slots for At<'_, R> {
    fn len_of(&self, obj: &ObjId) -> usize {
        self.doc.length_at(obj, self.heads)
    }
    fn slot(&self, obj: &ObjId, prop: Prop) -> Result<Option<(Value<'_>, ObjId)>, AutomergeError> {
        self.doc.get_at(obj, prop, self.heads)
    }
    fn slot_all(&self, obj: &ObjId, prop: Prop) -> Result<Vec<(Value<'_>, ObjId)>, AutomergeError> {
        self.doc.get_all_at(obj, prop, self.heads)
    }
    fn type_of(&self, obj: &ObjId) -> Result<ObjType, AutomergeError> {
        self.doc.object_type(obj)
    }
    fn keys_of(&self, obj: &ObjId) -> Vec<String> {
        self.doc.keys_at(obj, self.heads).collect()
    }
    fn text_of(&self, obj: &ObjId) -> Result<String, AutomergeError> {
        self.doc.text_at(obj, self.heads)
    }
}
