import { create, toBinary } from '@bufbuild/protobuf';
import {
  FieldDescriptorProto_Label,
  FieldDescriptorProto_Type,
  FileDescriptorProtoSchema,
  FileDescriptorSetSchema,
} from '@bufbuild/protobuf/wkt';
import type { HealthState } from 'nice-grpc-server-health';
import { ServerReflectionService } from 'nice-grpc-server-reflection';

/*
 * What grpcurl-style clients ask of every gRPC server besides its own API:
 * health per service, and reflection under both of its names, describing
 * every service it lists.
 */

/** Reflection's full service names: v1, and v1alpha, which grpcurl before 1.8.8 and many other tools still ask for. */
export const REFLECTION_V1 = 'grpc.reflection.v1.ServerReflection';
export const REFLECTION_V1ALPHA = 'grpc.reflection.v1alpha.ServerReflection';
export const HEALTH_SERVICE = 'grpc.health.v1.Health';

/**
 * The v1alpha reflection service: the same messages, field for field, as v1
 * (v1 was v1alpha renamed), so the v1 implementation serves both; only the
 * method path differs.
 */
export const ServerReflectionV1AlphaService = {
  serverReflectionInfo: {
    ...ServerReflectionService.serverReflectionInfo,
    path: `/${REFLECTION_V1ALPHA}/ServerReflectionInfo`,
  },
} as unknown as typeof ServerReflectionService;

/**
 * A FileDescriptorSet holding grpc/health/v1/health.proto as nice-grpc-server-health
 * serves it (Check and Watch). Our descriptor set (gen/metalcast.binpb) has only
 * our files, so reflection listed the health service but answered "Symbol not
 * found" when asked to describe it. Sets concatenate: append this to ours.
 */
export function healthDescriptorSet(): Uint8Array {
  const { STRING: TYPE_STRING, ENUM: TYPE_ENUM } = FieldDescriptorProto_Type;
  const optional = FieldDescriptorProto_Label.OPTIONAL;
  const file = create(FileDescriptorProtoSchema, {
    name: 'grpc/health/v1/health.proto',
    package: 'grpc.health.v1',
    syntax: 'proto3',
    messageType: [
      { name: 'HealthCheckRequest', field: [{ name: 'service', number: 1, label: optional, type: TYPE_STRING, jsonName: 'service' }] },
      {
        name: 'HealthCheckResponse',
        field: [
          {
            name: 'status',
            number: 1,
            label: optional,
            type: TYPE_ENUM,
            typeName: '.grpc.health.v1.HealthCheckResponse.ServingStatus',
            jsonName: 'status',
          },
        ],
        enumType: [
          {
            name: 'ServingStatus',
            value: [
              { name: 'UNKNOWN', number: 0 },
              { name: 'SERVING', number: 1 },
              { name: 'NOT_SERVING', number: 2 },
              { name: 'SERVICE_UNKNOWN', number: 3 },
            ],
          },
        ],
      },
    ],
    service: [
      {
        name: 'Health',
        method: [
          { name: 'Check', inputType: '.grpc.health.v1.HealthCheckRequest', outputType: '.grpc.health.v1.HealthCheckResponse' },
          {
            name: 'Watch',
            inputType: '.grpc.health.v1.HealthCheckRequest',
            outputType: '.grpc.health.v1.HealthCheckResponse',
            serverStreaming: true,
          },
        ],
      },
    ],
    options: { javaPackage: 'io.grpc.health.v1', goPackage: 'google.golang.org/grpc/health/grpc_health_v1' },
  });
  return toBinary(FileDescriptorSetSchema, create(FileDescriptorSetSchema, { file: [file] }));
}

/**
 * Sets the overall status ('') and that of every served service at once, so
 * that `Check` answers for `metalcast.v1.NodeService` as it does for the
 * empty name (grpc-js's health checking and Kubernetes probes name services).
 */
export function setServingStatus(health: HealthState, services: readonly string[], status: 'healthy' | 'unhealthy'): void {
  health.setStatus(status);
  for (const service of services) health.setStatus(status, service);
}
