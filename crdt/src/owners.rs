//! Which top-level key of a document each Automerge object lives under.
//!
//! Why it exists: the store keeps a materialized view (`kv`) with one row per top-level key,
//! and after applying changes it must refresh exactly the rows they touched. Asking Automerge
//! (`diff` between the old and new heads) costs time proportional to the document, so a
//! follower applying one small change to a long-lived document paid most of its CPU there.
//! Instead, the touched keys are read off the changes' own operations: an op on the root map
//! names its key, and an op inside a nested object belongs to the top-level key under which
//! that object was created (Automerge objects never move). An op also overwrites the ops its
//! `pred` names, wherever they are: an honest op names values at its own place, but a crafted
//! one may name a value under another key, which Automerge then drops too, so those keys are
//! touched as well. This map remembers the top-level key of every visible op it has seen
//! (values and objects; an op is forgotten once a change overwrites it, so the map stays about
//! as big as the visible document); it is built once from the visible document when first
//! needed and then extended by every change the store applies, local or remote.
//!
//! An op on an object, or a `pred` naming an op, that the map does not know (one created and
//! overwritten before the map was built, say) makes [`Owners::touched`] answer `None`, and the
//! caller falls back to the Automerge diff: never a wrong answer, only a slower one.

use std::collections::{BTreeSet, HashMap};

use automerge::legacy::{Key, ObjectId};
use automerge::{ActorId, Automerge, Change, ObjId, ReadDoc, Value, ROOT};

/// Owner (top-level key) of each known op: the values it put and the objects it made.
#[derive(Default, Clone)]
pub(crate) struct Owners {
    owner: HashMap<(u64, ActorId), String>,
}

impl Owners {
    /// The owners of every object reachable in `am` (including conflicting values).
    pub(crate) fn of_doc(am: &Automerge) -> Owners {
        let mut o = Owners::default();
        for key in am.keys(ROOT) {
            let Ok(values) = am.get_all(ROOT, key.as_str()) else {
                continue;
            };
            for (v, id) in values {
                if matches!(v, Value::Object(_)) {
                    o.walk(am, &id, &key);
                } else {
                    o.note(&id, &key);
                }
            }
        }
        o
    }

    fn note(&mut self, id: &ObjId, top: &str) {
        if let ObjId::Id(ctr, actor, _) = id {
            self.owner.insert((*ctr, actor.clone()), top.to_string());
        }
    }

    fn walk(&mut self, am: &Automerge, obj: &ObjId, top: &str) {
        self.note(obj, top);
        let children: Vec<(Value<'_>, ObjId)> = match am.object_type(obj) {
            Ok(automerge::ObjType::Map) | Ok(automerge::ObjType::Table) => am
                .keys(obj)
                .flat_map(|k| am.get_all(obj, k.as_str()).unwrap_or_default())
                .collect(),
            Ok(automerge::ObjType::List) => (0..am.length(obj))
                .flat_map(|i| am.get_all(obj, i).unwrap_or_default())
                .collect(),
            _ => Vec::new(),
        };
        for (v, id) in children {
            if matches!(v, Value::Object(_)) {
                self.walk(am, &id, top);
            } else {
                self.note(&id, top);
            }
        }
    }

    /// The top-level keys `changes` touch (where their ops are, and where the ops they
    /// overwrite are), recording their ops. `None` if an op names an object or overwrites an
    /// op this map does not know (the caller must then ask Automerge).
    pub(crate) fn touched<'a>(
        &mut self,
        changes: impl IntoIterator<Item = &'a Change>,
    ) -> Option<BTreeSet<String>> {
        let t = self.touched_partly(changes);
        t.complete.then_some(t.keys)
    }

    /// What [`Owners::touched`] knows even when it cannot answer for everything: the keys it
    /// found, the `pred` ops it did not know (their keys are for the caller to find, in the
    /// view's `kv.ops`), and whether it found every key.
    pub(crate) fn touched_partly<'a>(
        &mut self,
        changes: impl IntoIterator<Item = &'a Change>,
    ) -> TouchedKeys {
        let mut keys = BTreeSet::new();
        let mut unknown_preds = Vec::new();
        let mut known = true;
        let mut unplaced = false;
        for change in changes {
            let Some(expanded) = crate::store::panic_safe(|| change.decode()) else {
                known = false;
                unplaced = true;
                continue;
            };
            let start = change.start_op().get();
            let actor = change.actor_id();
            for (i, op) in expanded.operations.iter().enumerate() {
                let top = match &op.obj {
                    ObjectId::Root => match &op.key {
                        Key::Map(k) => Some(k.to_string()),
                        Key::Seq(_) => None,
                    },
                    ObjectId::Id(o) => self.owner.get(&(o.0, o.1.clone())).cloned(),
                };
                let Some(top) = top else {
                    known = false;
                    unplaced = true;
                    continue;
                };
                for p in op.pred.iter() {
                    // An overwritten op is forgotten: the map holds about one entry per
                    // visible value, not one per op ever applied. (A concurrent change naming
                    // it again takes the slow path.)
                    match self.owner.remove(&(p.0, p.1.clone())) {
                        Some(k) => {
                            keys.insert(k);
                        }
                        None => {
                            known = false;
                            unknown_preds.push((p.0, p.1.to_bytes().to_vec()));
                        }
                    }
                }
                self.owner
                    .insert((start + i as u64, actor.clone()), top.clone());
                keys.insert(top);
            }
        }
        TouchedKeys {
            keys,
            unknown_preds,
            complete: known,
            unplaced,
        }
    }
}

/// See [`Owners::touched_partly`].
pub(crate) struct TouchedKeys {
    pub(crate) keys: BTreeSet<String>,
    pub(crate) unknown_preds: Vec<(u64, Vec<u8>)>,
    pub(crate) complete: bool,
    /// Some op's own top-level key is not known (an op in an object the map never saw, or a
    /// change that does not decode): only Automerge's diff can say what changed.
    pub(crate) unplaced: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::ObjType;

    fn change_keys(before: &Automerge, after: &Automerge) -> Vec<Change> {
        let heads = before.get_heads();
        after.get_changes(&heads)
    }

    #[test]
    fn nested_edits_are_charged_to_their_top_level_key() {
        let mut am = Automerge::new();
        let mut tx = am.transaction();
        let limits = tx.put_object(ROOT, "limits", ObjType::Map).unwrap();
        let hosts = tx.put_object(&limits, "hosts", ObjType::List).unwrap();
        tx.insert(&hosts, 0, "a").unwrap();
        tx.put(ROOT, "name", "x").unwrap();
        tx.commit();
        let mut owners = Owners::of_doc(&am);

        // An edit deep inside `limits`, plus an object created inside it and then edited.
        let before = am.clone();
        let mut tx = am.transaction();
        tx.insert(&hosts, 1, "b").unwrap();
        let inner = tx.put_object(&limits, "inner", ObjType::Map).unwrap();
        tx.put(&inner, "k", 1).unwrap();
        tx.commit();
        let changes = change_keys(&before, &am);
        assert_eq!(
            owners.touched(&changes),
            Some(BTreeSet::from(["limits".to_string()]))
        );

        // The object created by the previous change is known from then on.
        let before = am.clone();
        let mut tx = am.transaction();
        tx.put(&inner, "k", 2).unwrap();
        tx.delete(ROOT, "name").unwrap();
        tx.commit();
        let changes = change_keys(&before, &am);
        assert_eq!(
            owners.touched(&changes),
            Some(BTreeSet::from(["limits".to_string(), "name".to_string()]))
        );
    }

    #[test]
    fn a_put_that_overwrites_a_value_under_another_key_touches_that_key_too() {
        let mut am = Automerge::new();
        let mut tx = am.transaction();
        tx.put(ROOT, "a", 1).unwrap();
        tx.put(ROOT, "k", 1).unwrap();
        tx.commit();
        let mut owners = Owners::of_doc(&am);
        let a_op = match am.get(ROOT, "a").unwrap().unwrap().1 {
            ObjId::Id(ctr, actor, _) => automerge::legacy::OpId(ctr, actor),
            ObjId::Root => unreachable!(),
        };
        // An honest put at `k`, then the same put crafted to name `a`'s value as overwritten.
        let before = am.clone();
        let mut tx = am.transaction();
        tx.put(ROOT, "k", 2).unwrap();
        tx.commit();
        let honest = change_keys(&before, &am).remove(0);
        assert_eq!(
            owners.clone().touched([&honest]),
            Some(BTreeSet::from(["k".to_string()]))
        );
        let mut e = honest.decode();
        e.hash = None;
        e.operations[0].pred = vec![a_op].into();
        let crafted = Change::from(e);
        assert_eq!(
            owners.touched([&crafted]),
            Some(BTreeSet::from(["a".to_string(), "k".to_string()]))
        );
        // A pred naming an op nobody has seen asks for the slow path.
        let mut e = honest.decode();
        e.hash = None;
        e.operations[0].pred = vec![automerge::legacy::OpId(
            999,
            ActorId::from([7u8; 32].as_slice()),
        )]
        .into();
        assert_eq!(owners.touched([&Change::from(e)]), None);
    }

    #[test]
    fn the_map_stays_the_size_of_the_visible_document() {
        let mut am = Automerge::new();
        let mut tx = am.transaction();
        tx.put(ROOT, "a", 0).unwrap();
        tx.commit();
        let mut owners = Owners::of_doc(&am);
        for i in 1..=500 {
            let before = am.clone();
            let mut tx = am.transaction();
            tx.put(ROOT, "a", i).unwrap();
            tx.commit();
            let changes = change_keys(&before, &am);
            assert_eq!(
                owners.touched(&changes),
                Some(BTreeSet::from(["a".to_string()]))
            );
        }
        assert_eq!(owners.owner.len(), 1, "one visible value, one entry");
    }

    #[test]
    fn an_unknown_object_asks_for_the_slow_path() {
        let mut am = Automerge::new();
        let mut tx = am.transaction();
        let gone = tx.put_object(ROOT, "gone", ObjType::Map).unwrap();
        tx.commit();
        // Another replica edits `gone` concurrently with its deletion here.
        let mut other = am.fork();
        let forked = am.clone();
        let mut tx = other.transaction();
        tx.put(&gone, "k", 1).unwrap();
        tx.commit();
        let mut tx = am.transaction();
        tx.delete(ROOT, "gone").unwrap();
        tx.commit();
        // The map built after the deletion does not know `gone`.
        let mut owners = Owners::of_doc(&am);
        let changes = change_keys(&forked, &other);
        assert_eq!(changes.len(), 1);
        assert_eq!(owners.touched(&changes), None);
    }
}
