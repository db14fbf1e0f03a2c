//! Local membership edits, by an admin (add, role, scopes, removal) or by any member (its
//! own addresses): edit a copy of the evaluated membership document → sign → judge it by the
//! same rule as received changes (`crate::membership`) before storing → store it through the
//! ingest path (`ingest_inner`), so a local edit and a received one reach SQLite the same way.

use std::collections::BTreeMap;

use automerge::{ActorId, Automerge, Change};
use rusqlite::params;

use super::{member_json, Outcome, Store};
use crate::error::StoreError;
use crate::identity::{NodeId, SecretKey};
use crate::json::{self, PathSeg};
use crate::membership::{self, Member, MemberChange, Role};
use crate::signed::{SignedChange, MEMBERSHIP_DOC};

impl Store {
    /// Add a member (admin only). The change is durable when this returns.
    #[allow(clippy::too_many_arguments)]
    pub fn add_member(
        &mut self,
        key: &SecretKey,
        id: NodeId,
        name: &str,
        role: Role,
        addrs: Vec<String>,
        scopes: Vec<String>,
        now_ms: i64,
    ) -> Result<SignedChange, StoreError> {
        if role == Role::Removed {
            return Err(StoreError::Invalid("use remove to remove a member".into()));
        }
        if let Some(m) = self.membership.get(&id) {
            if m.role == Role::Removed {
                return Err(StoreError::Denied(format!(
                    "{id} was removed for good; a removed key cannot come back: generate a new key on that node"
                )));
            }
            return Err(StoreError::Invalid(format!(
                "{id} is already a member ({})",
                m.role.as_str()
            )));
        }
        let m = Member {
            name: name.to_string(),
            role,
            addrs,
            scopes,
            cutoff: BTreeMap::new(),
        };
        membership::validate_member(&m).map_err(StoreError::Invalid)?;
        self.member_edit(key, &id, Some(m), now_ms)
    }

    fn member_record(&self, id: &NodeId) -> Result<Member, StoreError> {
        self.membership
            .get(id)
            .cloned()
            .ok_or_else(|| StoreError::Invalid(format!("{id} is not a member")))
    }

    /// Change a member's role (admin only). A demotion records the cut-off (see
    /// [`crate::membership`]).
    pub fn set_role(
        &mut self,
        key: &SecretKey,
        id: NodeId,
        role: Role,
        now_ms: i64,
    ) -> Result<SignedChange, StoreError> {
        let mut m = self.member_record(&id)?;
        if role < m.role {
            m.cutoff = self.cutoff_for(&id)?;
        }
        m.role = role;
        self.member_edit(key, &id, Some(m), now_ms)
    }

    /// Change a member's scopes (admin only). Narrowing records the cut-off.
    pub fn set_scopes(
        &mut self,
        key: &SecretKey,
        id: NodeId,
        scopes: Vec<String>,
        now_ms: i64,
    ) -> Result<SignedChange, StoreError> {
        if scopes.len() > membership::MAX_MEMBER_SCOPES {
            return Err(StoreError::Invalid(format!(
                "{} scopes (at most {})",
                scopes.len(),
                membership::MAX_MEMBER_SCOPES
            )));
        }
        for s in &scopes {
            membership::validate_scope(s).map_err(StoreError::Invalid)?;
        }
        let mut m = self.member_record(&id)?;
        m.cutoff = self.cutoff_for(&id)?;
        m.scopes = scopes;
        self.member_edit(key, &id, Some(m), now_ms)
    }

    /// Remove a member for good (admin only), recording the revocation cut-off: the member's
    /// changes this node holds stay valid; any others it made are void everywhere.
    pub fn remove_member(
        &mut self,
        key: &SecretKey,
        id: NodeId,
        now_ms: i64,
    ) -> Result<SignedChange, StoreError> {
        let mut m = self.member_record(&id)?;
        m.cutoff = self.cutoff_for(&id)?;
        m.role = Role::Removed;
        self.member_edit(key, &id, Some(m), now_ms)
    }

    /// Set this node's own advertised addresses (any member).
    pub fn set_own_addrs(
        &mut self,
        key: &SecretKey,
        addrs: Vec<String>,
        now_ms: i64,
    ) -> Result<Option<SignedChange>, StoreError> {
        let me = key.node_id();
        let mut m = self
            .membership
            .get(&me)
            .cloned()
            .ok_or_else(|| StoreError::Denied("this node is not a member yet".into()))?;
        if m.addrs == addrs {
            return Ok(None);
        }
        if addrs.len() > membership::MAX_MEMBER_ADDRS {
            return Err(StoreError::Invalid(format!(
                "{} addresses (at most {})",
                addrs.len(),
                membership::MAX_MEMBER_ADDRS
            )));
        }
        for a in &addrs {
            membership::validate_addr(a).map_err(StoreError::Invalid)?;
        }
        m.addrs = addrs;
        self.member_edit(key, &me, Some(m), now_ms).map(Some)
    }

    fn cutoff_for(&self, id: &NodeId) -> Result<BTreeMap<String, u64>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT doc, MAX(seq) FROM changes WHERE author = ?1 AND status = 0 GROUP BY doc",
        )?;
        let rows = stmt.query_map(params![id.0.to_vec()], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
        })?;
        let mut out = BTreeMap::new();
        for row in rows {
            let (d, s) = row?;
            out.insert(d, s as u64);
        }
        Ok(out)
    }

    fn member_edit(
        &mut self,
        key: &SecretKey,
        id: &NodeId,
        m: Option<Member>,
        now_ms: i64,
    ) -> Result<SignedChange, StoreError> {
        let me = key.node_id();
        if self.membership.root.is_none() {
            return Err(StoreError::Denied(
                "membership has not been received yet: wait for sync with a member".into(),
            ));
        }
        if let Some(f) = self.forks.get(&(MEMBERSHIP_DOC.to_string(), me)) {
            return Err(StoreError::Denied(format!(
                "this key signed two different membership changes at seq {f} (a cloned key?), \
                 so its membership changes from seq {f} on are void everywhere; another admin \
                 must remove it, then join this machine again with a new key"
            )));
        }
        self.repair()?;
        self.refuse_if_repairing(MEMBERSHIP_DOC, &me)?;
        let mut am = self.membership_doc()?;
        am.set_actor(ActorId::from(me.0.as_slice()));
        let mut tx = am.transaction();
        let path = [PathSeg::Key("members".into()), PathSeg::Key(id.to_string())];
        let res = match &m {
            Some(m) => json::put_path(&mut tx, &path, &member_json(m)),
            None => json::delete_path(&mut tx, &path),
        };
        match res {
            Ok(true) => {}
            Ok(false) => {
                tx.rollback();
                return Err(StoreError::Invalid("nothing to change".into()));
            }
            Err(e) => {
                tx.rollback();
                return Err(e.into());
            }
        }
        tx.commit_with(automerge::transaction::CommitOptions::default().with_time(now_ms));
        let change = am
            .get_last_local_change()
            .ok_or_else(|| StoreError::Automerge("no change after commit".into()))?;
        let hash = change.hash().0;
        let signed = SignedChange::sign_hashed(
            key,
            &self.cluster,
            MEMBERSHIP_DOC,
            &hash,
            change.raw_bytes().to_vec(),
        );
        // The same rule that judges remote changes judges our own: check before storing.
        let mut candidate = self.member_changes.clone();
        let mine = MemberChange {
            hash,
            author: me,
            seq: change.seq(),
            start_op: change.start_op().get(),
            deps: change.deps().iter().map(|d| d.0).collect(),
            change: change.clone(),
        };
        candidate.push(mine.clone());
        let eval = self.evaluate_with(&candidate, &[mine]);
        if let Some(reason) = eval.void.get(&hash) {
            return Err(StoreError::Denied(format!(
                "membership change refused: {reason}"
            )));
        }
        // Our own membership change: committed with the local fsync policy.
        self.sync_for(true)?;
        let report = self.ingest_inner(vec![signed.clone()])?;
        match report.outcomes.first().map(|o| &o.3) {
            Some(Outcome::Applied) => Ok(signed),
            other => Err(StoreError::Denied(format!(
                "membership change not applied: {other:?}"
            ))),
        }
    }

    /// Evaluate membership over `all` (the held changes plus `new`), extending the cached
    /// evaluation when possible.
    pub(super) fn evaluate_with(
        &self,
        all: &[MemberChange],
        new: &[MemberChange],
    ) -> membership::Evaluation {
        match &self.member_eval {
            Some(prev) => membership::evaluate_extend(&self.cluster, prev, all, new),
            None => membership::evaluate(&self.cluster, all),
        }
    }

    fn membership_doc(&self) -> Result<Automerge, StoreError> {
        if let Some(e) = &self.member_eval {
            return Ok(e.doc.clone());
        }
        let mut am = Automerge::new();
        let changes: Vec<Change> = membership::topo_order(&self.member_changes)
            .into_iter()
            .map(|i| &self.member_changes[i])
            .filter(|c| self.member_valid.contains(&c.hash))
            .map(|c| c.change.clone())
            .collect();
        am.apply_changes(changes)
            .map_err(|e| StoreError::Automerge(e.to_string()))?;
        Ok(am)
    }
}
