//! [`BlockingClient`]: the async client driven by its own current-thread
//! runtime. Do not call it from inside another tokio runtime.

use std::path::PathBuf;
use std::time::Duration;

use hyper::Method;

use super::{Client, ClientError, MutationOutcome, RawResponse};
use crate::{FaultInjected, FaultKind, GuestWorkers, Operation, VcpuList, VmInfo};

/// The same calls as [`Client`], blocking.
#[derive(Debug)]
pub struct BlockingClient {
    client: Client,
    runtime: tokio::runtime::Runtime,
}

impl BlockingClient {
    /// A blocking client for the API served at `socket_path`.
    pub fn new(socket_path: impl Into<PathBuf>) -> Result<Self, ClientError> {
        Self::from_client(Client::new(socket_path))
    }

    /// Wrap an async client (keeps its timeout).
    pub fn from_client(client: Client) -> Result<Self, ClientError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ClientError::Runtime)?;
        Ok(Self { client, runtime })
    }

    /// The async client underneath.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// `GET /api/v1/vm`.
    pub fn vm(&self) -> Result<VmInfo, ClientError> {
        self.runtime.block_on(self.client.vm())
    }

    /// `GET /api/v1/vcpus`.
    pub fn vcpus(&self) -> Result<VcpuList, ClientError> {
        self.runtime.block_on(self.client.vcpus())
    }

    /// `PUT /api/v1/vcpus`.
    pub fn resize(
        &self,
        desired: u32,
        wait: Option<Duration>,
    ) -> Result<MutationOutcome, ClientError> {
        self.runtime.block_on(self.client.resize(desired, wait))
    }

    /// `PUT /api/v1/vcpus/{id}`.
    pub fn add_vcpu(
        &self,
        id: u32,
        wait: Option<Duration>,
    ) -> Result<MutationOutcome, ClientError> {
        self.runtime.block_on(self.client.add_vcpu(id, wait))
    }

    /// `DELETE /api/v1/vcpus/{id}`.
    pub fn remove_vcpu(
        &self,
        id: u32,
        wait: Option<Duration>,
    ) -> Result<MutationOutcome, ClientError> {
        self.runtime.block_on(self.client.remove_vcpu(id, wait))
    }

    /// `GET /api/v1/operations/{id}`.
    pub fn operation(&self, id: u64) -> Result<Operation, ClientError> {
        self.runtime.block_on(self.client.operation(id))
    }

    /// `GET /api/v1/metrics`.
    pub fn metrics(&self) -> Result<String, ClientError> {
        self.runtime.block_on(self.client.metrics())
    }

    /// `GET /api/v1/guest/workers`.
    pub fn guest_workers(&self) -> Result<GuestWorkers, ClientError> {
        self.runtime.block_on(self.client.guest_workers())
    }

    /// `POST /api/v1/test/faults`; see [`Client::inject_fault`].
    pub fn inject_fault(
        &self,
        fault: FaultKind,
        cpu: Option<u32>,
    ) -> Result<FaultInjected, ClientError> {
        self.runtime.block_on(self.client.inject_fault(fault, cpu))
    }

    /// Any request; see [`Client::request`].
    pub fn request(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<(&str, Vec<u8>)>,
    ) -> Result<RawResponse, ClientError> {
        self.runtime
            .block_on(self.client.request(method, path_and_query, body))
    }
}
