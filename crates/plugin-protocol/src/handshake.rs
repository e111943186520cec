//! go-plugin's handshake: the environment the host sets, and the one line the plugin prints
//! on stdout once it listens: `CORE|APP|NETWORK|ADDRESS|PROTOCOL[|CERT]`.

use std::fmt;

/// Environment variable whose value proves to a plugin that a Mycelium host started it.
pub const MAGIC_COOKIE_KEY: &str = "MYCELIUM_PLUGIN_MAGIC_COOKIE";
/// The value of [`MAGIC_COOKIE_KEY`]. Not a secret: a guard against running a plugin by hand.
pub const MAGIC_COOKIE_VALUE: &str = "6d79636c-6975-6d2d-6675-6e6374696f6e";
/// go-plugin's core protocol version.
pub const CORE_PROTOCOL_VERSION: u32 = 1;
/// Mycelium's application protocol version (`mycelium.function.v1`).
pub const APP_PROTOCOL_VERSION: u32 = 1;
/// The health service name go-plugin registers.
pub const HEALTH_SERVICE: &str = "plugin";
/// Application protocol versions the host offers, comma-separated.
pub const PROTOCOL_VERSIONS_ENV: &str = "PLUGIN_PROTOCOL_VERSIONS";
/// Directory in which the plugin should create its Unix socket.
pub const UNIX_SOCKET_DIR_ENV: &str = "PLUGIN_UNIX_SOCKET_DIR";
/// Lowest TCP port a plugin listening on TCP may use.
pub const MIN_PORT_ENV: &str = "PLUGIN_MIN_PORT";
/// Highest TCP port a plugin listening on TCP may use.
pub const MAX_PORT_ENV: &str = "PLUGIN_MAX_PORT";

/// How the plugin listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    /// A Unix domain socket path.
    Unix,
    /// A `host:port`.
    Tcp,
}

/// What the plugin speaks over its socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// gRPC over HTTP/2, as every go-plugin plugin does.
    Grpc,
    /// Mycelium's frame protocol ([`crate::frames`]), when the host offered it.
    Frames,
}

/// A parsed handshake line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handshake {
    /// The application protocol version the plugin chose.
    pub app_version: u32,
    /// Socket kind.
    pub network: Network,
    /// Socket path or `host:port`.
    pub address: String,
    /// The protocol the plugin chose.
    pub protocol: Protocol,
}

/// Why a handshake line is unusable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeError(pub String);

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HandshakeError {}

impl Handshake {
    /// Parses the plugin's first stdout line.
    pub fn parse(line: &str) -> Result<Self, HandshakeError> {
        let shown: String = line.chars().take(200).collect();
        let fail = |why: &str| {
            Err(HandshakeError(format!(
                "malformed handshake {shown:?}: {why}"
            )))
        };
        let parts: Vec<&str> = line.trim_end_matches(['\r', '\n']).split('|').collect();
        if parts.len() < 5 || parts.len() > 6 {
            return fail("expected CORE|APP|NETWORK|ADDRESS|PROTOCOL");
        }
        if parts[0] != CORE_PROTOCOL_VERSION.to_string() {
            return fail(&format!(
                "core protocol version {} is not {CORE_PROTOCOL_VERSION}",
                parts[0]
            ));
        }
        let Ok(app_version) = parts[1].parse::<u32>() else {
            return fail("the application protocol version is not a number");
        };
        if app_version != APP_PROTOCOL_VERSION {
            return fail(&format!(
                "application protocol version {app_version} is not {APP_PROTOCOL_VERSION}"
            ));
        }
        let network = match parts[2] {
            "unix" => Network::Unix,
            "tcp" => Network::Tcp,
            other => return fail(&format!("network {other:?} is neither unix nor tcp")),
        };
        if parts[3].is_empty() {
            return fail("the address is empty");
        }
        let protocol = match parts[4] {
            "grpc" => Protocol::Grpc,
            crate::frames::PROTOCOL => Protocol::Frames,
            "netrpc" | "" => return fail("the plugin speaks net/rpc; Mycelium needs a gRPC plugin (plugin.Serve with GRPCServer)"),
            other => return fail(&format!("protocol {other:?} is neither grpc nor {}", crate::frames::PROTOCOL)),
        };
        if parts.len() == 6 && !parts[5].is_empty() {
            return fail("the plugin offers AutoMTLS, which this host does not request");
        }
        Ok(Self {
            app_version,
            network,
            address: parts[3].to_owned(),
            protocol,
        })
    }

    /// The line a plugin prints (without the newline).
    pub fn line(&self) -> String {
        let network = match self.network {
            Network::Unix => "unix",
            Network::Tcp => "tcp",
        };
        let protocol = match self.protocol {
            Protocol::Grpc => "grpc",
            Protocol::Frames => crate::frames::PROTOCOL,
        };
        format!(
            "{CORE_PROTOCOL_VERSION}|{}|{network}|{}|{protocol}",
            self.app_version, self.address
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #[test]
        fn any_line_parses_or_is_refused(line in ".{0,200}") {
            if let Ok(handshake) = Handshake::parse(&line) {
                // What is accepted has an address to connect to.
                proptest::prop_assert!(!handshake.address.is_empty());
            }
        }

        #[test]
        fn handshake_shaped_lines_parse_or_are_refused(
            fields in proptest::collection::vec("[0-9a-z/.:|]{0,30}", 0..8),
        ) {
            let _ = Handshake::parse(&fields.join("|"));
        }
    }

    #[test]
    fn parses_go_plugin_lines() {
        let unix = Handshake::parse("1|1|unix|/tmp/plugin123|grpc\n").unwrap();
        assert_eq!(
            (unix.network, unix.address.as_str()),
            (Network::Unix, "/tmp/plugin123")
        );
        assert_eq!(Handshake::parse(&unix.line()).unwrap(), unix);
        let tcp = Handshake::parse("1|1|tcp|127.0.0.1:10000|grpc|").unwrap();
        assert_eq!((tcp.network, tcp.protocol), (Network::Tcp, Protocol::Grpc));
        let frames = Handshake::parse("1|1|unix|/tmp/p|mycelium-frames").unwrap();
        assert_eq!(frames.protocol, Protocol::Frames);
        assert_eq!(Handshake::parse(&frames.line()).unwrap(), frames);
    }

    #[test]
    fn rejects_everything_else() {
        for (line, why) in [
            ("hello world", "expected CORE"),
            ("2|1|unix|/x|grpc", "core protocol version 2"),
            ("1|9|unix|/x|grpc", "application protocol version 9"),
            ("1|x|unix|/x|grpc", "not a number"),
            ("1|1|udp|/x|grpc", "neither unix nor tcp"),
            ("1|1|unix||grpc", "address is empty"),
            ("1|1|unix|/x|netrpc", "net/rpc"),
            ("1|1|unix|/x|grpc|Q0VSVA==", "AutoMTLS"),
        ] {
            let err = Handshake::parse(line).unwrap_err().to_string();
            assert!(err.contains(why), "{line}: {err}");
        }
    }
}
