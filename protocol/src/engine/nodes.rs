//! Node retirement (a successor inherits a retired node's rights) and
//! location declarations.

use automerge::ScalarValue;

use super::Engine;
use crate::ids::NodeTag;
use crate::layout::{self, DocId};
use crate::ops::{OpError, OpReply};

impl Engine {
    /// Retires `node`: its key is refused mesh-wide and its rights pass to `successor`.
    pub(super) fn retire(
        &mut self,
        node: &str,
        successor: &str,
        now_ms: u64,
    ) -> Result<OpReply, OpError> {
        let from = self
            .views
            .tag_of(node)
            .ok_or_else(|| OpError::NotFound(format!("unknown node {node:?}")))?;
        let to = self
            .views
            .tag_of(successor)
            .ok_or_else(|| OpError::NotFound(format!("unknown node {successor:?}")))?;
        if from == to {
            return Err(OpError::BadRequest("a node cannot succeed itself".into()));
        }
        if let Some(admins) = &self.authority.administrators {
            if !admins.contains(&self.tag) {
                // Peers would refuse the change (and every later change of
                // the mesh document behind it).
                return Err(OpError::Conflict {
                    code: "not_administrator".into(),
                    message: "this node is not one of the chain's administrators; run the retirement at an administrator node".into(),
                });
            }
        }
        if from == self.tag {
            return Err(OpError::BadRequest(
                "run the retirement at another node than the one retired".into(),
            ));
        }
        if self.views.resolve(to) != to {
            return Err(OpError::BadRequest(format!(
                "{successor} is itself retired"
            )));
        }
        if let Some(existing) = self.views.retired.get(&from) {
            if *existing == to {
                return Ok(Self::reply(
                    crate::ops::ReplyKind::Ok,
                    serde_json::json!({"node": node, "successor": successor, "retired": true}),
                ));
            }
            return Err(OpError::Conflict {
                code: "already_retired".into(),
                message: format!("{node} was already retired to another successor"),
            });
        }
        let value = serde_json::json!({"successor": to.hex(), "successor_name": successor, "by": self.cfg.name, "at_ms": now_ms}).to_string();
        self.put(
            DocId::Mesh,
            layout::retired_key(from),
            ScalarValue::Str(value.into()),
        );
        self.note_retirement(from, to);
        Ok(Self::reply(
            crate::ops::ReplyKind::Created,
            serde_json::json!({"node": node, "successor": successor, "retired": true}),
        ))
    }

    pub(super) fn note_retirement(&mut self, retired: NodeTag, successor: NodeTag) {
        if self.views.retired.get(&retired) == Some(&successor) {
            return;
        }
        if retired == self.tag {
            tracing::error!(
                "this node was retired; its rights passed to its successor and peers refuse it"
            );
        }
        self.views.retired.insert(retired, successor);
        // Rights moved: every row that holds cells or grants of the retired node changes.
        let touched: Vec<(u64, String)> = self
            .views
            .stock
            .iter()
            .flat_map(|(p, m)| {
                m.iter()
                    .filter(|(_, e)| {
                        e.cells.keys().any(|a| a.tag() == retired)
                            || e.cells.values().any(|c| {
                                c.granted.contains_key(&retired) || c.held.contains_key(&retired)
                            })
                    })
                    .map(move |(l, _)| (*p, l.clone()))
            })
            .collect();
        for (p, l) in touched {
            self.touch_row(p, &l);
        }
    }

    /// `POST /api/locations`: declares a location the chain knows without a
    /// node of its own, so receipts, adjustments and transfers may name it.
    pub(crate) fn declare_location(
        &mut self,
        d: crate::ops::DeclareLocation,
        now_ms: u64,
    ) -> Result<OpReply, OpError> {
        if let Some((_, info)) = self
            .views
            .nodes
            .iter()
            .find(|(_, i)| i.location.as_deref() == Some(d.location.as_str()))
        {
            return Err(OpError::Conflict {
                code: "location_owned".into(),
                message: format!(
                    "location {} is the own location of node {}; it needs no declaration",
                    d.location, info.name
                ),
            });
        }
        if let Some(o) = &d.owner {
            if self.views.tag_of(o).is_none() {
                return Err(OpError::NotFound(format!("unknown node {o:?}")));
            }
        }
        let body =
            serde_json::json!({"location": d.location, "timezone": d.timezone, "owner": d.owner});
        if let Some(old) = self.views.declared.get(&d.location) {
            if old.timezone == d.timezone && old.owner == d.owner {
                return Ok(Self::reply(crate::ops::ReplyKind::Ok, body));
            }
        }
        let value = layout::DeclaredLocation {
            location: d.location.clone(),
            timezone: d.timezone.clone(),
            owner: d.owner.clone(),
            by: Some(self.cfg.name.clone()),
            at_ms: now_ms,
        };
        let json = serde_json::to_string(&value).unwrap_or_default();
        self.put(
            DocId::Mesh,
            layout::location_key(&d.location),
            ScalarValue::Str(json.into()),
        );
        self.views.declared.insert(d.location.clone(), value);
        Ok(Self::reply(crate::ops::ReplyKind::Created, body))
    }

    /// Refuses a location the chain does not know (CONTRACT v2: receipts,
    /// adjustments and transfers name a node's own or a declared location).
    pub(crate) fn known_location(&self, location: &str) -> Result<(), OpError> {
        if location == self.cfg.location || self.views.knows_location(location) {
            return Ok(());
        }
        // A configured peer whose directory entry has not arrived yet: its
        // location is its name unless it says otherwise.
        if self.views.configured.contains_key(location)
            && !self.views.nodes.values().any(|i| i.name == location)
        {
            return Ok(());
        }
        // Stock booked there already (its node's directory entry may still be
        // on its way, or an import opened it): the chain knows it.
        let prefix = format!("ledger/{location}/");
        if self
            .docs
            .range(prefix.clone()..)
            .next()
            .is_some_and(|(id, _)| id.starts_with(&prefix))
        {
            return Ok(());
        }
        Err(OpError::NotFound(format!(
            "unknown location {location:?}: not the location of a node of the chain; declare it with POST /api/locations"
        )))
    }

    /// Node ids' tags that are retired (the shell refuses their connections).
    pub fn retired_tags(&self) -> Vec<NodeTag> {
        self.views.retired.keys().copied().collect()
    }
}
