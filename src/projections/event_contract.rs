//! The projections' lenient parser (`event.rs`, ADR 0006) against the
//! domain: every event type, encoded by the ledger exactly as a command
//! writes it, decodes through `ProjectedEvent` with the fields the read
//! models use. The matches below have no wildcard arm, so a new event type
//! does not compile until it is added here.

use chrono::{DateTime, NaiveDate, Utc};
use serde_json::json;
use uuid::Uuid;

use super::event::ProjectedEvent;
use crate::commands::approval::events::{
    ApprovalDecided, ApprovalEvent, ApprovalExpired, ApprovalRequested,
};
use crate::commands::job::events::{
    CallbackDelivered, CallbackFailed, JobCancelled, JobCompleted, JobEvent, JobFailed,
    JobHandlerChanged, JobRetried, JobStarted, JobSubmitted, StepAttemptStarted,
    StepResultRecorded, StepRetryScheduled, StepStatus,
};
use crate::commands::projection::events::{ProjectionEvent, ProjectionEventSkipped};
use crate::commands::rejected_callback::events::{CallbackEvent, CallbackRejected};
use crate::commands::secret_access::events::{
    AccessRequest, DecidedBy, SecretAccessDenied, SecretAccessEvent, SecretAccessFailed,
    SecretAccessGranted, ValueSource, VaultFailure,
};
use crate::commands::secret_cache::events::{SecretCacheEvent, SecretCacheInvalidated};
use crate::commands::workflow::events::{AutoApprovalCounted, WorkflowEvent, WorkflowSwitched};
use crate::events::chain;
use crate::events::envelope::{self, Actor, OutgoingRecord};

fn at() -> DateTime<Utc> {
    "2026-12-01T10:00:00Z".parse().expect("a time")
}

/// Encodes `event` as the ledger does and reads it back as projections do.
fn projected<E: serde::Serialize + cqrs_es::DomainEvent>(
    aggregate_type: &str,
    event: &E,
) -> ProjectedEvent {
    let actor = Actor {
        client_id: "billing".into(),
        user_id: Some("alice".into()),
    };
    let occurred_at = envelope::format_time(at());
    let mut records = [OutgoingRecord {
        event_id: Uuid::now_v7(),
        aggregate_type,
        aggregate_id: "j-1",
        aggregate_version: 1,
        schema_version: event.event_version(),
        occurred_at: &occurred_at,
        actor: &actor,
        command_id: "c",
        correlation_id: "c",
        causation_id: "c",
        command_hash: "",
        prev_hash: String::new(),
        event,
    }];
    let commit = envelope::encode_commit(&mut records, chain::GENESIS).expect("encodes");
    let mut lines =
        envelope::decode_commit_as::<ProjectedEvent>(&commit.body).expect("projections read it");
    assert_eq!(lines.len(), 1);
    let (_, p) = lines.remove(0);
    assert_eq!(p.event_type, event.event_type());
    assert_eq!(p.aggregate_type, aggregate_type);
    assert_eq!(p.aggregate_id, "j-1");
    assert_eq!(p.actor, actor);
    assert_eq!(p.occurred_at, occurred_at);
    p
}

fn wk(p: &ProjectedEvent) -> Option<&str> {
    p.data.workflow_key.as_deref()
}

fn job_events() -> Vec<JobEvent> {
    let k = || "invoice.extract".to_string();
    vec![
        JobEvent::JobSubmitted(JobSubmitted {
            workflow_key: k(),
            client_id: "billing".into(),
            input: json!({"invoice": 1, "lines": [1, 2]}),
            priority: 7,
            timeout_seconds: 60,
            callback_url: Some("https://example.com/cb".into()),
            callback_url_sealed: None,
            metadata: json!({"user_id": "bob", "trace": {"id": 1}}),
            retry_of: Some("j-0".into()),
        }),
        JobEvent::JobStarted(JobStarted { workflow_key: k() }),
        JobEvent::StepAttemptStarted(StepAttemptStarted {
            workflow_key: k(),
            step: "ocr".into(),
            attempt: 2,
            idempotency_key: "j-1:ocr:2".into(),
        }),
        JobEvent::StepResultRecorded(StepResultRecorded {
            workflow_key: k(),
            step: "ocr".into(),
            attempt: 2,
            status: StepStatus::TimedOut,
            output: json!({"partial": true}),
            error_code: Some("step_timeout".into()),
            error_message: Some("no answer".into()),
            duration_ms: 1234,
            n8n_execution_id: Some("4711".into()),
        }),
        JobEvent::StepRetryScheduled(StepRetryScheduled {
            workflow_key: k(),
            step: "ocr".into(),
            attempt: 3,
            delay_ms: 5000,
        }),
        JobEvent::JobCompleted(JobCompleted {
            workflow_key: k(),
            outputs: json!({"total": 7}),
        }),
        JobEvent::JobFailed(JobFailed {
            workflow_key: k(),
            error_code: "steps_failed".into(),
            error_message: "0 of 1".into(),
        }),
        JobEvent::JobCancelled(JobCancelled {
            workflow_key: k(),
            reason: "asked".into(),
        }),
        JobEvent::CallbackDelivered(CallbackDelivered {
            workflow_key: k(),
            target: "https://example.com/cb".into(),
            attempts: 1,
            status_code: 200,
        }),
        JobEvent::CallbackFailed(CallbackFailed {
            workflow_key: k(),
            target: "https://example.com/cb".into(),
            attempts: 5,
            error_message: "refused".into(),
        }),
        JobEvent::JobHandlerChanged(JobHandlerChanged {
            workflow_key: k(),
            fence: 12,
            holder: "host/42/abc".into(),
        }),
        JobEvent::JobRetried(JobRetried {
            workflow_key: k(),
            retry_job_id: "j-2".into(),
        }),
    ]
}

#[test]
fn every_job_event_decodes_through_the_projection_parser() {
    for e in job_events() {
        let p = projected("job", &e);
        let d = &p.data;
        assert_eq!(wk(&p), Some("invoice.extract"), "{e:?}");
        match &e {
            JobEvent::JobSubmitted(s) => {
                assert_eq!(d.client_id.as_deref(), Some(s.client_id.as_str()));
                assert_eq!(d.priority, Some(i64::from(s.priority)));
                let input = d.input.as_ref().map(|r| r.get().to_string());
                assert_eq!(input, Some(s.input.to_string()));
                assert_eq!(d.metadata_user_id.as_deref(), Some("bob"));
                assert_eq!(d.retry_of, s.retry_of);
            }
            JobEvent::JobRetried(r) => {
                assert_eq!(d.retry_job_id.as_deref(), Some(r.retry_job_id.as_str()));
            }
            JobEvent::StepResultRecorded(s) => {
                assert_eq!(d.step.as_deref(), Some(s.step.as_str()));
                assert_eq!(d.status.as_deref(), Some(s.status.as_str()));
                assert_eq!(d.error_code, s.error_code);
                assert_eq!(d.error_message, s.error_message);
                assert_eq!(d.duration_ms, i64::try_from(s.duration_ms).ok());
            }
            JobEvent::StepAttemptStarted(s) => {
                assert_eq!(d.step.as_deref(), Some(s.step.as_str()));
            }
            JobEvent::StepRetryScheduled(s) => {
                assert_eq!(d.step.as_deref(), Some(s.step.as_str()));
            }
            JobEvent::JobCompleted(c) => {
                let outputs = d.outputs.as_ref().map(|r| r.get().to_string());
                assert_eq!(outputs, Some(c.outputs.to_string()));
            }
            JobEvent::JobFailed(f) => {
                assert_eq!(d.error_code.as_deref(), Some(f.error_code.as_str()));
                assert_eq!(d.error_message.as_deref(), Some(f.error_message.as_str()));
            }
            JobEvent::JobCancelled(c) => {
                assert_eq!(d.reason.as_deref(), Some(c.reason.as_str()));
            }
            JobEvent::CallbackFailed(c) => {
                assert_eq!(d.error_message.as_deref(), Some(c.error_message.as_str()));
            }
            JobEvent::JobStarted(_)
            | JobEvent::CallbackDelivered(_)
            | JobEvent::JobHandlerChanged(_) => {}
        }
    }
}

#[test]
fn every_approval_event_decodes_through_the_projection_parser() {
    let decided = || ApprovalDecided {
        job_id: "j-1".into(),
        workflow_key: "invoice.extract".into(),
        decided_by: "alice".into(),
        reason: "checked".into(),
        decided_at: at(),
    };
    let events = [
        ApprovalEvent::ApprovalRequested(ApprovalRequested {
            job_id: "j-1".into(),
            workflow_key: "invoice.extract".into(),
            requested_by: "flowledger-handler".into(),
            reason: Some("needs approval".into()),
            expires_at: at() + chrono::Duration::days(1),
        }),
        ApprovalEvent::ApprovalGranted(decided()),
        ApprovalEvent::ApprovalRejected(decided()),
        ApprovalEvent::ApprovalExpired(ApprovalExpired {
            job_id: "j-1".into(),
            workflow_key: "invoice.extract".into(),
            expired_at: at(),
        }),
    ];
    for e in events {
        let p = projected("approval", &e);
        let d = &p.data;
        assert_eq!(d.job_id.as_deref(), Some("j-1"), "{e:?}");
        assert_eq!(wk(&p), Some("invoice.extract"), "{e:?}");
        match &e {
            ApprovalEvent::ApprovalRequested(r) => {
                assert_eq!(d.requested_by.as_deref(), Some(r.requested_by.as_str()));
                assert_eq!(d.reason, r.reason);
                let expires = d.expires_at.as_deref().map(DateTime::parse_from_rfc3339);
                assert_eq!(
                    expires.and_then(Result::ok).map(|t| t.with_timezone(&Utc)),
                    Some(r.expires_at)
                );
            }
            ApprovalEvent::ApprovalGranted(x) | ApprovalEvent::ApprovalRejected(x) => {
                assert_eq!(d.decided_by.as_deref(), Some(x.decided_by.as_str()));
                assert_eq!(d.reason.as_deref(), Some(x.reason.as_str()));
            }
            ApprovalEvent::ApprovalExpired(_) => {}
        }
    }
}

#[test]
fn workflow_callback_and_projection_events_decode_through_the_projection_parser() {
    let switched = || WorkflowSwitched {
        workflow_key: "invoice.extract".into(),
        reason: "incident".into(),
    };
    for e in [
        WorkflowEvent::WorkflowDisabled(switched()),
        WorkflowEvent::WorkflowEnabled(switched()),
        WorkflowEvent::AutoApprovalCounted(AutoApprovalCounted {
            workflow_key: "invoice.extract".into(),
            job_id: "j-1".into(),
            day: NaiveDate::from_ymd_opt(2026, 12, 1).expect("a day"),
            used: 1,
            limit: 10,
        }),
    ] {
        let p = projected("workflow", &e);
        assert_eq!(wk(&p), Some("invoice.extract"), "{e:?}");
        match &e {
            WorkflowEvent::WorkflowDisabled(s) | WorkflowEvent::WorkflowEnabled(s) => {
                assert_eq!(p.data.reason.as_deref(), Some(s.reason.as_str()));
            }
            WorkflowEvent::AutoApprovalCounted(c) => {
                assert_eq!(p.data.job_id.as_deref(), Some(c.job_id.as_str()));
            }
        }
    }
    let rejected = CallbackEvent::CallbackRejected(CallbackRejected {
        job_id: Some("j-1".into()),
        source: "n8n".into(),
        error_code: "bad_signature".into(),
        error_message: "signature does not match".into(),
    });
    let p = projected("callback", &rejected);
    match &rejected {
        CallbackEvent::CallbackRejected(r) => {
            assert_eq!(p.data.job_id, r.job_id);
            assert_eq!(p.data.error_code.as_deref(), Some(r.error_code.as_str()));
        }
    }
    let skipped = ProjectionEvent::ProjectionEventSkipped(ProjectionEventSkipped {
        version: 1,
        seq: 42,
        reason: "bad row".into(),
        skipped_by: "carol".into(),
    });
    let p = projected("projection", &skipped);
    match &skipped {
        ProjectionEvent::ProjectionEventSkipped(s) => {
            assert_eq!(p.data.reason.as_deref(), Some(s.reason.as_str()));
        }
    }
}

#[test]
fn every_secret_event_decodes_through_the_projection_parser() {
    let request = |job: bool| AccessRequest {
        path: "secret/data/external_apis/ocr".into(),
        field: Some("api_key".into()),
        version: Some(4),
        purpose: "call the OCR provider".into(),
        job_id: job.then(|| "j-1".into()),
        step: job.then(|| "ocr".into()),
    };
    let failure = || VaultFailure {
        kind: "failing".into(),
        status: Some(503),
        message: "Vault is sealed".into(),
    };
    let events = [
        SecretAccessEvent::SecretAccessGranted(SecretAccessGranted {
            request: request(true),
            rule: "ocr-handler".into(),
            kv_version: 4,
            source: ValueSource::LastKnownGood,
            read_from_vault_at: "2026-12-01T09:59:00Z".into(),
            vault_error: Some(failure()),
        }),
        SecretAccessEvent::SecretAccessDenied(SecretAccessDenied {
            request: request(false),
            decided_by: DecidedBy::Vault,
            rule: None,
            reason: "permission denied".into(),
            vault_error: Some(failure()),
        }),
        SecretAccessEvent::SecretAccessFailed(SecretAccessFailed {
            request: request(true),
            rule: "ocr-handler".into(),
            code: "unavailable".into(),
            vault_error: failure(),
        }),
    ];
    for e in events {
        let p = projected("secret_access", &e);
        let d = &p.data;
        let r = e.request();
        assert_eq!(d.path.as_deref(), Some(r.path.as_str()), "{e:?}");
        assert_eq!(d.field, r.field, "{e:?}");
        assert_eq!(d.version, r.version.and_then(|v| i64::try_from(v).ok()));
        assert_eq!(d.purpose.as_deref(), Some(r.purpose.as_str()));
        // top-level, so the audit trail has the job and the step
        assert_eq!(d.job_id, r.job_id, "{e:?}");
        assert_eq!(d.step, r.step, "{e:?}");
        let vault = |f: &VaultFailure| {
            let v = d.vault_error.as_ref().expect("vault_error read");
            assert_eq!(v.kind.as_deref(), Some(f.kind.as_str()));
            assert_eq!(v.status, f.status.map(i64::from));
            assert_eq!(v.message.as_deref(), Some(f.message.as_str()));
        };
        match &e {
            SecretAccessEvent::SecretAccessGranted(g) => {
                assert_eq!(d.rule.as_deref(), Some(g.rule.as_str()));
                assert_eq!(d.kv_version, i64::try_from(g.kv_version).ok());
                assert_eq!(d.source.as_deref(), Some("last_known_good"));
                assert_eq!(
                    d.read_from_vault_at.as_deref(),
                    Some(g.read_from_vault_at.as_str())
                );
                vault(g.vault_error.as_ref().expect("set above"));
            }
            SecretAccessEvent::SecretAccessDenied(x) => {
                assert_eq!(d.decided_by.as_deref(), Some("vault"));
                assert_eq!(d.rule, x.rule);
                assert_eq!(d.reason.as_deref(), Some(x.reason.as_str()));
                assert!(d.code.is_none());
                vault(x.vault_error.as_ref().expect("set above"));
            }
            SecretAccessEvent::SecretAccessFailed(f) => {
                assert_eq!(d.rule.as_deref(), Some(f.rule.as_str()));
                assert_eq!(d.code.as_deref(), Some(f.code.as_str()));
                vault(&f.vault_error);
            }
        }
    }
    let invalidated = SecretCacheEvent::SecretCacheInvalidated(SecretCacheInvalidated {
        path: "secret/data/external_apis/ocr".into(),
        reason: "rotated the OCR key".into(),
    });
    let p = projected("secret_cache", &invalidated);
    match &invalidated {
        SecretCacheEvent::SecretCacheInvalidated(i) => {
            assert_eq!(p.data.path.as_deref(), Some(i.path.as_str()));
            assert_eq!(p.data.reason.as_deref(), Some(i.reason.as_str()));
        }
    }
}

#[test]
fn every_memory_event_decodes_whole_for_the_memory_read_model() {
    use crate::commands::memory::events::{
        ChunkSpan, EpisodeEmbedded, EpisodeEmbeddingFailed, EpisodeExtracted,
        EpisodeExtractionFailed, EpisodeRecorded, EpisodeRetired, EpisodesRetired, FactForgotten,
        FactRecorded, MemoryEvent, MemorySubjectErased, MemorySubjectOpened, ProfileUpdated,
        WorkingStateDeleted, WorkingStateExpired, WorkingStateSet,
    };
    use crate::projections::memory;
    let ring = crate::crypto::SealKeys::single("m1", [7u8; 32]);
    let sealed = |v: serde_json::Value| ring.seal(v.to_string().as_bytes());
    let events = vec![
        MemoryEvent::MemorySubjectOpened(MemorySubjectOpened {
            owner: "billing".into(),
            subject_id: "person-1".into(),
            key_id: "m1".into(),
        }),
        MemoryEvent::EpisodeRecorded(EpisodeRecorded {
            episode_id: "t1".into(),
            turn_at: at(),
            turn: sealed(
                json!({"messages": [{"role": "user", "content": "hi"}], "response": "yo"}),
            ),
            chunks: vec![ChunkSpan {
                message: 0,
                start: 0,
                end: 2,
            }],
            messages: 1,
            extract: true,
        }),
        MemoryEvent::FactRecorded(FactRecorded {
            fact_id: "f1".into(),
            version: 2,
            fact: sealed(json!({"subject": "user", "key": "colour", "value": "red"})),
            value_seal: sealed(json!("red")),
            confidence: 0.5,
            source: "command".into(),
            episode_id: Some("t1".into()),
            valid_from: at(),
        }),
        MemoryEvent::FactForgotten(FactForgotten {
            fact_id: "f1".into(),
            version: 2,
            invalid_at: at(),
        }),
        MemoryEvent::ProfileUpdated(ProfileUpdated {
            fields: sealed(json!({"email": "a@b.c"})),
        }),
        MemoryEvent::WorkingStateSet(WorkingStateSet {
            key: "draft".into(),
            value: sealed(json!([1])),
            expires_at: at(),
        }),
        MemoryEvent::WorkingStateDeleted(WorkingStateDeleted {
            key: "draft".into(),
            reason: "deleted".into(),
        }),
        MemoryEvent::EpisodeEmbedded(EpisodeEmbedded {
            episode_id: "t1".into(),
            model: "embed-1".into(),
            dimensions: 2,
            vectors: vec![ring.seal(&[0u8; 8])],
        }),
        MemoryEvent::EpisodeEmbeddingFailed(EpisodeEmbeddingFailed {
            episode_id: "t1".into(),
            model: "embed-1".into(),
            dimensions: Some(2),
            reason: "status 500".into(),
        }),
        MemoryEvent::EpisodeRetired(EpisodeRetired {
            episode_id: "t1".into(),
            reason: "retention".into(),
            before: at(),
        }),
        MemoryEvent::WorkingStateExpired(WorkingStateExpired {
            keys: vec!["draft".into(), "cart".into()],
            expired_at: at(),
        }),
        MemoryEvent::EpisodesRetired(EpisodesRetired {
            episode_ids: vec!["t1".into(), "t2".into()],
            reason: "retention".into(),
            before: at(),
        }),
        MemoryEvent::EpisodeExtracted(EpisodeExtracted {
            episode_id: "t1".into(),
            model: Some("extract-1".into()),
            facts: 1,
        }),
        MemoryEvent::EpisodeExtractionFailed(EpisodeExtractionFailed {
            episode_id: "t1".into(),
            reason: "status".into(),
            status: Some(503),
            attempts: 5,
        }),
        MemoryEvent::MemorySubjectErased(MemorySubjectErased {
            key_id: "m1".into(),
            reason: "data_subject_request".into(),
        }),
    ];
    let actor = Actor {
        client_id: "billing".into(),
        user_id: None,
    };
    let occurred_at = envelope::format_time(at());
    for e in events {
        // no wildcard: a new memory event type must be added here and to
        // memory::EVENT_TYPES
        match &e {
            MemoryEvent::MemorySubjectOpened(_)
            | MemoryEvent::EpisodeRecorded(_)
            | MemoryEvent::FactRecorded(_)
            | MemoryEvent::FactForgotten(_)
            | MemoryEvent::ProfileUpdated(_)
            | MemoryEvent::WorkingStateSet(_)
            | MemoryEvent::WorkingStateDeleted(_)
            | MemoryEvent::EpisodeEmbedded(_)
            | MemoryEvent::EpisodeEmbeddingFailed(_)
            | MemoryEvent::EpisodeRetired(_)
            | MemoryEvent::EpisodesRetired(_)
            | MemoryEvent::WorkingStateExpired(_)
            | MemoryEvent::EpisodeExtracted(_)
            | MemoryEvent::EpisodeExtractionFailed(_)
            | MemoryEvent::MemorySubjectErased(_) => {}
        }
        let mut records = [OutgoingRecord {
            event_id: Uuid::now_v7(),
            aggregate_type: "memory",
            aggregate_id: "0123456789abcdef0123456789abcdef",
            aggregate_version: 1,
            schema_version: cqrs_es::DomainEvent::event_version(&e),
            occurred_at: &occurred_at,
            actor: &actor,
            command_id: "c",
            correlation_id: "c",
            causation_id: "c",
            command_hash: "",
            prev_hash: String::new(),
            event: &e,
        }];
        let commit = envelope::encode_commit(&mut records, chain::GENESIS).expect("encodes");
        let lines = envelope::decode_commit_as::<ProjectedEvent>(&commit.body).expect("reads");
        let (line, p) = &lines[0];
        let type_name = cqrs_es::DomainEvent::event_type(&e);
        assert!(
            memory::EVENT_TYPES.contains(&type_name.as_str()),
            "{type_name}"
        );
        let back = memory::decode(9, line, p)
            .expect("decodes")
            .expect("a known type");
        assert_eq!(*back, e);
    }
    // a later event type is passed over; a known one with a bad body is a poison
    let mut p = projected(
        "memory",
        &SecretCacheEvent::SecretCacheInvalidated(SecretCacheInvalidated {
            path: "x".into(),
            reason: "y".into(),
        }),
    );
    assert!(memory::decode(3, b"{}", &p).expect("passed over").is_none());
    p.event_type = "FactForgotten".into();
    let bad = json!({"event_id": Uuid::nil(), "aggregate_type": "memory", "aggregate_id": "a",
        "aggregate_version": 1, "event_type": "FactForgotten", "schema_version": "1.0",
        "occurred_at": occurred_at, "actor": {"client_id": "billing", "user_id": null},
        "command_id": "c", "correlation_id": "c", "causation_id": "c", "prev_hash": "00",
        "data": {"fact_id": 5}});
    match memory::decode(3, bad.to_string().as_bytes(), &p) {
        Err(crate::projections::ApplyError::Poison { seq: 3, reason }) => {
            assert!(reason.contains("FactForgotten"), "{reason}")
        }
        other => panic!("a poison, got {other:?}"),
    }
}
