//! gRPC server reflection on both roles' gRPC servers, so that grpcurl, grpcui, Postman or any
//! reflection client lists the services and calls them without our .proto files:
//! `grpc.reflection.v1.ServerReflection`, and `v1alpha` for the clients that only know it.
//!
//! The descriptors are those the generated code embeds (`file_descriptor_proto()`), for our
//! own files, gRPC health's and reflection's, indexed once when the server starts. Each request
//! of a reflection stream is answered inline on the completion-queue thread that read it: it
//! is a map lookup and a copy of a few kilobytes, nothing that waits.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures::{SinkExt, StreamExt};
use grpcio::{
    DuplexSink, Marshaller, Method, MethodType, RequestStream, RpcContext, RpcStatusCode, Service, ServiceBuilder,
    WriteFlags,
};
use log::debug;
use protobuf::descriptor::{DescriptorProto, FileDescriptorProto};
use protobuf::Message;

use crate::proto::reflection_v1::reflection::{
    ErrorResponse, ExtensionNumberResponse, FileDescriptorResponse, ListServiceResponse, ServerReflectionRequest,
    ServerReflectionRequest_oneof_message_request as Request, ServerReflectionResponse,
    ServerReflectionResponse_oneof_message_response as Response, ServiceResponse,
};
use crate::proto::reflection_v1::reflection_grpc::{create_server_reflection, ServerReflection};

/// The reflection services, as `list_services` names them.
pub const V1: &str = "grpc.reflection.v1.ServerReflection";
pub const V1ALPHA: &str = "grpc.reflection.v1alpha.ServerReflection";

/// v1alpha's one method. Its messages are v1's field for field (only their package differs,
/// which is not on the wire), so v1's types and handler serve it.
const V1ALPHA_INFO: Method<ServerReflectionRequest, ServerReflectionResponse> = Method {
    ty: MethodType::Duplex,
    name: "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    req_mar: Marshaller { ser: grpcio::pb_ser, de: grpcio::pb_de },
    resp_mar: Marshaller { ser: grpcio::pb_ser, de: grpcio::pb_de },
};

/// Every file a service of ours is declared in, and the files those import (none so far).
/// Health's is our copy: grpcio-health's own does not parse.
fn known_files() -> [&'static FileDescriptorProto; 4] {
    [
        crate::proto::protocol::file_descriptor_proto(),
        crate::proto::health::file_descriptor_proto(),
        crate::proto::reflection_v1::reflection::file_descriptor_proto(),
        crate::proto::reflection_v1alpha::reflection::file_descriptor_proto(),
    ]
}

/// Both reflection services for a server hosting `hosted` (full service names, such as
/// `protocol.PushServer`, besides reflection itself), to register with it.
pub fn services(hosted: &[&str]) -> [Service; 2] {
    let v1 = Reflection(Arc::new(Descriptors::new(hosted, &known_files())));
    let v1alpha = v1.clone();
    let v1alpha = ServiceBuilder::new()
        .add_duplex_streaming_handler(&V1ALPHA_INFO, move |ctx, requests, sink| v1alpha.answer_all(ctx, requests, sink))
        .build();
    [create_server_reflection(v1), v1alpha]
}

/// What one server can describe: its services, and the files declaring every symbol.
#[derive(Debug)]
struct Descriptors {
    /// Full names, hosted first, then reflection's.
    services: Vec<String>,
    /// By file name (`FileDescriptorProto.name`).
    files: HashMap<String, File>,
    /// Fully qualified service, method, message and enum names, and the file declaring each.
    symbols: HashMap<String, String>,
    /// The message types among `symbols`, for extension queries.
    messages: HashSet<String>,
}

#[derive(Debug)]
struct File {
    encoded: Vec<u8>,
    dependencies: Vec<String>,
}

/// A refused request: the status code and message of its `ErrorResponse`.
type Refusal = (RpcStatusCode, String);

impl Descriptors {
    fn new(hosted: &[&str], files: &[&FileDescriptorProto]) -> Descriptors {
        let mut descriptors = Descriptors {
            services: hosted.iter().map(|s| s.to_string()).chain([V1.to_string(), V1ALPHA.to_string()]).collect(),
            files: HashMap::new(),
            symbols: HashMap::new(),
            messages: HashSet::new(),
        };
        for file in files {
            descriptors.add(file);
        }
        descriptors
    }

    fn add(&mut self, file: &FileDescriptorProto) {
        let name = file.get_name().to_string();
        let scope = file.get_package();
        for message in file.get_message_type() {
            self.add_message(&name, scope, message);
        }
        for e in file.get_enum_type() {
            self.symbols.insert(qualify(scope, e.get_name()), name.clone());
        }
        for service in file.get_service() {
            let service_name = qualify(scope, service.get_name());
            for method in service.get_method() {
                self.symbols.insert(qualify(&service_name, method.get_name()), name.clone());
            }
            self.symbols.insert(service_name, name.clone());
        }
        let encoded = file.write_to_bytes().expect("encoding a FileDescriptorProto into a Vec cannot fail");
        self.files.insert(name, File { encoded, dependencies: file.get_dependency().to_vec() });
    }

    fn add_message(&mut self, file: &str, scope: &str, message: &DescriptorProto) {
        let full = qualify(scope, message.get_name());
        for nested in message.get_nested_type() {
            self.add_message(file, &full, nested);
        }
        for e in message.get_enum_type() {
            self.symbols.insert(qualify(&full, e.get_name()), file.to_string());
        }
        self.messages.insert(full.clone());
        self.symbols.insert(full, file.to_string());
    }

    /// The response to one request of a reflection stream.
    fn answer(&self, request: ServerReflectionRequest) -> ServerReflectionResponse {
        let outcome = match &request.message_request {
            Some(Request::list_services(_)) => Ok(self.list_services()),
            Some(Request::file_by_filename(name)) => self.file_with_dependencies(name),
            Some(Request::file_containing_symbol(symbol)) => match self.symbols.get(symbol) {
                Some(file) => self.file_with_dependencies(file),
                None => Err((RpcStatusCode::NOT_FOUND, format!("symbol {symbol:?} not found"))),
            },
            Some(Request::file_containing_extension(e)) => Err((
                RpcStatusCode::NOT_FOUND,
                format!(
                    "no extension {} of {:?}: these services declare no extensions",
                    e.extension_number, e.containing_type
                ),
            )),
            Some(Request::all_extension_numbers_of_type(message)) => self.extension_numbers(message),
            None => Err((RpcStatusCode::INVALID_ARGUMENT, "the request asks for nothing (no message_request)".into())),
        };
        let mut response = ServerReflectionResponse::new();
        response.set_valid_host(request.get_host().to_string());
        response.set_original_request(request);
        response.message_response = Some(outcome.unwrap_or_else(|(code, message)| {
            let mut error = ErrorResponse::new();
            error.set_error_code(code.into());
            error.set_error_message(message);
            Response::error_response(error)
        }));
        response
    }

    fn list_services(&self) -> Response {
        let mut list = ListServiceResponse::new();
        for name in &self.services {
            let mut service = ServiceResponse::new();
            service.set_name(name.clone());
            list.mut_service().push(service);
        }
        Response::list_services_response(list)
    }

    /// The file named `name`, then every file it imports, transitively, each once.
    fn file_with_dependencies(&self, name: &str) -> Result<Response, Refusal> {
        if !self.files.contains_key(name) {
            return Err((RpcStatusCode::NOT_FOUND, format!("file {name:?} not found")));
        }
        let mut order = vec![name];
        let mut next = 0;
        while let Some(&current) = order.get(next) {
            next += 1;
            // A dependency we do not have is left out (the client then reports what is missing);
            // the files after it are still walked.
            let Some(file) = self.files.get(current) else { continue };
            for dependency in &file.dependencies {
                if !order.contains(&dependency.as_str()) {
                    order.push(dependency);
                }
            }
        }
        let mut found = FileDescriptorResponse::new();
        found.set_file_descriptor_proto(
            order.iter().filter_map(|name| self.files.get(*name)).map(|f| f.encoded.clone()).collect(),
        );
        Ok(Response::file_descriptor_response(found))
    }

    /// A known message type has no extensions (none of these files declares any).
    fn extension_numbers(&self, message: &str) -> Result<Response, Refusal> {
        if !self.messages.contains(message) {
            return Err((RpcStatusCode::NOT_FOUND, format!("message type {message:?} not found")));
        }
        let mut numbers = ExtensionNumberResponse::new();
        numbers.set_base_type_name(message.to_string());
        Ok(Response::all_extension_numbers_response(numbers))
    }
}

fn qualify(scope: &str, name: &str) -> String {
    if scope.is_empty() {
        name.to_string()
    } else {
        format!("{scope}.{name}")
    }
}

/// The handler of both versions; cloned by grpcio once per completion queue.
#[derive(Clone)]
struct Reflection(Arc<Descriptors>);

impl Reflection {
    /// Answers each request as it comes, in order, until the client closes its side.
    fn answer_all(
        &self,
        ctx: RpcContext,
        requests: RequestStream<ServerReflectionRequest>,
        mut sink: DuplexSink<ServerReflectionResponse>,
    ) {
        let descriptors = self.0.clone();
        let mut responses =
            requests.map(move |request| request.map(|r| (descriptors.answer(r), WriteFlags::default())));
        let peer = ctx.peer();
        ctx.spawn(async move {
            let ended = match sink.send_all(&mut responses).await {
                Ok(()) => sink.close().await,
                Err(e) => Err(e),
            };
            if let Err(e) = ended {
                debug!("a reflection stream from {peer} ended early: {e}");
            }
        });
    }
}

impl ServerReflection for Reflection {
    fn server_reflection_info(
        &mut self,
        ctx: RpcContext,
        requests: RequestStream<ServerReflectionRequest>,
        sink: DuplexSink<ServerReflectionResponse>,
    ) {
        self.answer_all(ctx, requests, sink);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protobuf::descriptor::{EnumDescriptorProto, ServiceDescriptorProto};

    fn descriptors(hosted: &[&str]) -> Descriptors {
        Descriptors::new(hosted, &known_files())
    }

    fn ask(d: &Descriptors, request: Request) -> Response {
        let mut req = ServerReflectionRequest::new();
        req.set_host("h".into());
        req.message_request = Some(request);
        let response = d.answer(req.clone());
        assert_eq!(response.get_valid_host(), "h");
        assert_eq!(response.get_original_request(), &req);
        response.message_response.unwrap()
    }

    /// The names of the files in a file descriptor response, in order.
    fn file_names(response: Response) -> Vec<String> {
        let Response::file_descriptor_response(found) = response else { panic!("not files: {response:?}") };
        found
            .get_file_descriptor_proto()
            .iter()
            .map(|bytes| FileDescriptorProto::parse_from_bytes(bytes).unwrap().get_name().to_string())
            .collect()
    }

    fn error(response: Response) -> (i32, String) {
        let Response::error_response(e) = response else { panic!("not an error: {response:?}") };
        (e.get_error_code(), e.get_error_message().to_string())
    }

    #[test]
    fn lists_the_hosted_services_then_reflection() {
        let d = descriptors(&["protocol.PushServer", "grpc.health.v1.Health"]);
        let Response::list_services_response(list) = ask(&d, Request::list_services(String::new())) else {
            panic!("not a list")
        };
        let names: Vec<&str> = list.get_service().iter().map(ServiceResponse::get_name).collect();
        assert_eq!(names, ["protocol.PushServer", "grpc.health.v1.Health", V1, V1ALPHA]);
    }

    #[test]
    fn every_service_of_both_roles_has_its_file() {
        let d = descriptors(&[]);
        for (symbol, file) in [
            ("protocol.PushServer", "protocol.proto"),
            ("protocol.ConnectNode", "protocol.proto"),
            ("grpc.health.v1.Health", "grpc/health/v1/health.proto"),
            (V1, "grpc/reflection/v1/reflection.proto"),
            (V1ALPHA, "grpc/reflection/v1alpha/reflection.proto"),
        ] {
            assert_eq!(file_names(ask(&d, Request::file_containing_symbol(symbol.into()))), [file], "{symbol}");
        }
    }

    #[test]
    fn finds_methods_messages_and_nested_types() {
        let d = descriptors(&[]);
        for symbol in [
            "protocol.PushServer.Broadcast",
            "protocol.ConnectNode.BroadcastBatch",
            "protocol.BroadCastReq",
            "grpc.health.v1.HealthCheckResponse.ServingStatus",
            "grpc.reflection.v1alpha.ServerReflectionRequest",
        ] {
            assert_eq!(file_names(ask(&d, Request::file_containing_symbol(symbol.into()))).len(), 1, "{symbol}");
        }
    }

    #[test]
    fn unknown_names_are_not_found() {
        let d = descriptors(&[]);
        let not_found = i32::from(RpcStatusCode::NOT_FOUND);
        assert_eq!(
            error(ask(&d, Request::file_containing_symbol("protocol.Nope".into()))),
            (not_found, "symbol \"protocol.Nope\" not found".into())
        );
        assert_eq!(
            error(ask(&d, Request::file_by_filename("nope.proto".into()))),
            (not_found, "file \"nope.proto\" not found".into())
        );
        assert_eq!(error(ask(&d, Request::all_extension_numbers_of_type("protocol.Nope".into()))).0, not_found);
        assert_eq!(error(ask(&d, Request::file_containing_extension(Default::default()))).0, not_found);
        let (code, message) = error(d.answer(ServerReflectionRequest::new()).message_response.unwrap());
        assert_eq!((code, message.as_str()), (3, "the request asks for nothing (no message_request)"));
    }

    #[test]
    fn a_known_message_has_no_extension_numbers() {
        let d = descriptors(&[]);
        let response = ask(&d, Request::all_extension_numbers_of_type("protocol.Proto".into()));
        let Response::all_extension_numbers_response(numbers) = response else { panic!("{response:?}") };
        assert_eq!(numbers.get_base_type_name(), "protocol.Proto");
        assert!(numbers.get_extension_number().is_empty());
    }

    fn file(name: &str, package: &str, dependencies: &[&str]) -> FileDescriptorProto {
        let mut file = FileDescriptorProto::new();
        file.set_name(name.into());
        file.set_package(package.into());
        file.set_dependency(dependencies.iter().map(|d| d.to_string()).collect());
        file
    }

    #[test]
    fn a_file_comes_with_its_dependencies_each_once() {
        // a imports b and c, b imports c and d; d is not known.
        let a = file("a.proto", "", &["b.proto", "c.proto"]);
        let mut b = file("b.proto", "pkg.b", &["c.proto", "d.proto"]);
        let mut service = ServiceDescriptorProto::new();
        service.set_name("S".into());
        b.mut_service().push(service);
        let mut message = DescriptorProto::new();
        message.set_name("M".into());
        let mut nested = DescriptorProto::new();
        nested.set_name("N".into());
        let mut e = EnumDescriptorProto::new();
        e.set_name("E".into());
        nested.mut_enum_type().push(e);
        message.mut_nested_type().push(nested);
        let mut c = file("c.proto", "", &[]);
        c.mut_message_type().push(message);
        let d = Descriptors::new(&[], &[&a, &b, &c]);
        assert_eq!(file_names(ask(&d, Request::file_by_filename("a.proto".into()))), ["a.proto", "b.proto", "c.proto"]);
        assert_eq!(file_names(ask(&d, Request::file_containing_symbol("pkg.b.S".into()))), ["b.proto", "c.proto"]);
        assert_eq!(file_names(ask(&d, Request::file_containing_symbol("M.N.E".into()))), ["c.proto"]);

        // A missing import does not end the walk: what the imports after it import still comes.
        let x = file("x.proto", "", &["missing.proto", "y.proto"]);
        let y = file("y.proto", "", &["z.proto"]);
        let z = file("z.proto", "", &[]);
        let d = Descriptors::new(&[], &[&x, &y, &z]);
        assert_eq!(file_names(ask(&d, Request::file_by_filename("x.proto".into()))), ["x.proto", "y.proto", "z.proto"]);
    }
}
