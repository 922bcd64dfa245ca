import type { PeerCertificate } from 'node:tls';
import { ServerInterceptingCall, type ServerInterceptor, ServerListenerBuilder } from '@grpc/grpc-js';
import type { CallContext } from 'nice-grpc';
import type { OperatorRole } from '../store/store.js';

/**
 * Operator mTLS: with --tls-client-ca the controller asks every client for a
 * certificate without requiring one (agents have none). A certificate that
 * the client CA signed gives its holder a role from its subject's
 * organizational unit: OU=admin or OU=reader (OU=admin wins when both are
 * there); a verified certificate with neither gives no role, and one the CA
 * did not sign is ignored as if there were none. A bearer token, when the
 * call carries one, is checked instead (controller/auth/operator-auth.ts).
 *
 * nice-grpc's CallContext does not reach the TLS connection, so a grpc-js
 * server interceptor, which can (getAuthContext: the peer certificate when
 * it verified), hands the certificate on as call metadata. It first removes
 * whatever a client sent under that key, so the key cannot be forged.
 */

/** Metadata key carrying the verified client certificate (fingerprint, CN, OUs), set only by the interceptor. */
export const CLIENT_CERTIFICATE_KEY = 'metalcast-verified-client-certificate';

function values(field: string | string[] | undefined): string[] {
  if (field === undefined) return [];
  return Array.isArray(field) ? field : [field];
}

function encode(certificate: PeerCertificate): string {
  const params = new URLSearchParams({ fingerprint: certificate.fingerprint256 });
  for (const cn of values(certificate.subject?.CN)) params.append('cn', cn);
  for (const ou of values(certificate.subject?.OU)) params.append('ou', ou);
  return params.toString();
}

/** Install on every controller server (grpc-js ServerOptions.interceptors), TLS or not: it also strips forged keys. */
export const clientCertificateInterceptor: ServerInterceptor = (_method, call) =>
  new ServerInterceptingCall(call, {
    start: (next) =>
      next(
        new ServerListenerBuilder()
          .withOnReceiveMetadata((metadata, proceed) => {
            metadata.remove(CLIENT_CERTIFICATE_KEY);
            const certificate = call.getAuthContext().sslPeerCertificate;
            if (certificate) metadata.set(CLIENT_CERTIFICATE_KEY, encode(certificate));
            proceed(metadata);
          })
          .build(),
      ),
  });

/** The verified client certificate of a call, if it has one: its subject's CN and OUs and its SHA-256 fingerprint. */
export function verifiedClientCertificate(context: CallContext): { fingerprint: string; cn: string[]; ou: string[] } | undefined {
  const value = context.metadata.get(CLIENT_CERTIFICATE_KEY);
  if (!value) return undefined;
  const params = new URLSearchParams(value);
  const fingerprint = params.get('fingerprint');
  if (!fingerprint) return undefined;
  return { fingerprint, cn: params.getAll('cn'), ou: params.getAll('ou') };
}

/**
 * The operator role a call's verified client certificate gives (OU=admin or
 * OU=reader), with a subject to name the caller in logs; undefined without
 * a verified certificate or without either OU. The seam of OperatorAuth
 * (`certificateRole`).
 */
export function clientCertificateRole(context: CallContext): { role: OperatorRole; subject: string } | undefined {
  const certificate = verifiedClientCertificate(context);
  if (!certificate) return undefined;
  const role: OperatorRole | undefined = certificate.ou.includes('admin')
    ? 'admin'
    : certificate.ou.includes('reader')
      ? 'reader'
      : undefined;
  if (!role) return undefined;
  const subject = [...certificate.cn.map((cn) => `CN=${cn}`), ...certificate.ou.map((ou) => `OU=${ou}`)].join(',');
  return { role, subject: `${subject} (${certificate.fingerprint.slice(0, 23)}…)` };
}
