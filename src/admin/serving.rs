//! Whether a role still wants work: SERVING until its drain starts, NOT_SERVING from then on,
//! told to load balancers through `grpc.health.v1.Health` on the role's own gRPC port and to
//! HTTP probes through `/readyz`. Flipped before anything stops, so a balancer that checks
//! often stops sending while the port still answers.

use std::sync::atomic::{AtomicBool, Ordering};

use grpcio_health::{HealthService, ServingStatus};

/// The health service's full name, as reflection lists it.
pub const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

/// A role's serving state and the health service that reports it.
pub struct Serving {
    draining: AtomicBool,
    health: HealthService,
}

impl Serving {
    /// SERVING for the server as a whole (service `""`) and for each of `services` (full names,
    /// like `protocol.PushServer`).
    pub fn new(services: &[&str]) -> Serving {
        let health = HealthService::default();
        for service in std::iter::once(&"").chain(services) {
            health.set_serving_status(service, ServingStatus::Serving);
        }
        Serving { draining: AtomicBool::new(false), health }
    }

    /// The `grpc.health.v1.Health` service to register on the role's gRPC server.
    pub fn health_service(&self) -> grpcio::Service {
        grpcio_health::create_health(self.health.clone())
    }

    /// From now on NOT_SERVING, for every service and every `Watch` in progress. Idempotent.
    pub fn begin_drain(&self) {
        if !self.draining.swap(true, Ordering::SeqCst) {
            // Also makes the health service ignore any later change.
            self.health.shutdown();
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}

impl std::fmt::Debug for Serving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serving").field("draining", &self.is_draining()).finish()
    }
}
