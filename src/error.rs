//! The one error type of the service and its one mapping to gRPC status.
//!
//! Every layer returns [`Error`]; only [`Error::into_status`] decides codes and details, with
//! no wildcard arm, so a new variant cannot reach a caller with a code nobody chose. Metrics
//! and logs label an error by its gRPC code ([`Error::code`], `metrics::code_label`), a closed
//! set.

use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::echo;
use crate::kernel::KernelError;

/// Why a call failed.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Error {
    /// The request is malformed: `field` is at fault for `reason`.
    #[error("{field} {reason}")]
    InvalidArgument {
        /// The request field at fault, e.g. `labels` or `sample_weights`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The request names something this server does not have (an Open Inference Protocol
    /// model or model version).
    #[error("{0}")]
    NotFound(String),
    /// The request exceeds a hard limit of this server and will never succeed here.
    #[error("{0}")]
    ResourceExhausted(String),
    /// The server cannot take the call now; retry after the delay (possibly elsewhere).
    #[error("{reason}")]
    Unavailable {
        /// Which limit was hit.
        reason: String,
        /// A suggested retry delay.
        retry_after: Duration,
    },
    /// The call's deadline passed before it could be answered.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The caller went away.
    #[error("cancelled by the caller")]
    Cancelled,
    /// The call carries no valid credentials (a bearer token missing or wrong).
    #[error("{0}")]
    Unauthenticated(String),
    /// The RPC belongs to the protocol but xentd does not do what it asks (a model repository,
    /// shared memory, ...); the message says what xentd does instead.
    #[error("{0}")]
    Unimplemented(String),
    /// A bug: an invariant did not hold. The server keeps serving.
    #[error("internal error: {0}")]
    Internal(String),
    /// The server cannot start: a setting names a file that is missing or wrong. Never a
    /// call's answer.
    #[error("{0}")]
    Startup(String),
}

impl Error {
    /// An [`Error::InvalidArgument`] for `field`. A field name can come from the client (an
    /// Open Inference Protocol input or parameter name), so it is kept bounded and escaped
    /// ([`echo::name`]).
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Error {
        let field = field.into();
        let field = if field.len() > echo::MAX_CHARS || field.chars().any(char::is_control) {
            echo::name(&field)
        } else {
            field
        };
        Error::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }

    /// The message a status or log line carries: [`echo::message`]'s bound on the whole text,
    /// whatever it was built from.
    pub fn message(&self) -> String {
        echo::message(&self.to_string())
    }

    /// The field at fault, if any.
    pub fn field(&self) -> Option<&str> {
        match self {
            Error::InvalidArgument { field, .. } => Some(field),
            Error::NotFound(_)
            | Error::ResourceExhausted(_)
            | Error::Unavailable { .. }
            | Error::DeadlineExceeded(_)
            | Error::Cancelled
            | Error::Unauthenticated(_)
            | Error::Unimplemented(_)
            | Error::Internal(_)
            | Error::Startup(_) => None,
        }
    }

    /// The gRPC code.
    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument { .. } => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Unavailable { .. } => Code::Unavailable,
            Error::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Error::Cancelled => Code::Cancelled,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::Unimplemented(_) => Code::Unimplemented,
            Error::Internal(_) | Error::Startup(_) => Code::Internal,
        }
    }

    /// The gRPC status, with `google.rpc.BadRequest` or `RetryInfo` details where they apply.
    pub fn into_status(self) -> Status {
        let message = self.message();
        let code = self.code();
        match self {
            Error::InvalidArgument { field, reason } => Status::with_error_details(
                Code::InvalidArgument,
                message,
                ErrorDetails::with_bad_request_violation(field, echo::message(&reason)),
            ),
            Error::Unavailable { retry_after, .. } => Status::with_error_details(
                Code::Unavailable,
                message,
                ErrorDetails::with_retry_info(Some(retry_after)),
            ),
            Error::NotFound(_)
            | Error::ResourceExhausted(_)
            | Error::DeadlineExceeded(_)
            | Error::Cancelled
            | Error::Unauthenticated(_)
            | Error::Unimplemented(_)
            | Error::Internal(_)
            | Error::Startup(_) => Status::new(code, message),
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        e.into_status()
    }
}

impl From<KernelError> for Error {
    fn from(e: KernelError) -> Error {
        match e {
            KernelError::ClassIdOutOfRange { .. } => Error::invalid("labels", e.to_string()),
            KernelError::Inconsistent(_) => Error::Internal(e.to_string()),
        }
    }
}
